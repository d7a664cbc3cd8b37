-- The change feed of SPEC §2: every change another writer (Django) makes to an input of the
-- counts reaches tally through this outbox, in the changing transaction.
--
-- One AFTER … FOR EACH STATEMENT trigger per table and operation reads the statement's
-- transition tables and appends ONE outbox row per statement: the table, the operation and
-- the ids of the rows whose count inputs changed. `Deployment.update_children`'s 100k-row
-- UPDATE therefore costs one join of its transition tables and one outbox row, not 100k
-- trigger calls and 100k outbox rows (docs/benchmarks.md has the measured cost).
--
-- Updates that change no input column (tally's count writes, Django's
-- `update_calculated_fields`, a `save()` that rewrites every column with the same input
-- values) append nothing. Sessions of tally itself set `tally.origin = 'tally'`: its own
-- writes already reach the dataflow in the transaction that makes them, and the triggers skip
-- them at once.
--
-- tally reads the outbox in `seq` order, re-reads the rows by id (a row that is gone is a
-- delete), applies the differences to the dataflow, writes the counts that changed and
-- deletes the outbox rows it read, all in one transaction. Re-reading current rows makes
-- every entry idempotent: an entry seen twice, or late, changes nothing.
CREATE TABLE tally.change_outbox (
    seq        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name text        NOT NULL,
    -- INSERT, UPDATE, DELETE or TRUNCATE (a TRUNCATE makes tally rebuild from the tables).
    op         text        NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    ids        bigint[]    NOT NULL,
    -- When the change was made (the feed's lag is now() minus the oldest).
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

COMMENT ON TABLE tally.change_outbox IS
    'Changes to the inputs of the stored counts made by other writers; consumed by tally serve.';

-- Appends one entry and wakes tally (NOTIFY is sent at commit; identical ones are merged).
CREATE FUNCTION tally.feed_append(tbl text, operation text, changed bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(changed) > 0 OR operation = 'TRUNCATE' THEN
        INSERT INTO tally.change_outbox (table_name, op, ids) VALUES (tbl, operation, changed);
        PERFORM pg_notify('tally_changes', tbl);
    END IF;
END
$$;

-- True in tally's own sessions (whose writes reach the dataflow directly).
CREATE FUNCTION tally.feed_skips() RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT current_setting('tally.origin', true) IS NOT DISTINCT FROM 'tally' $$;

-- One trigger function for every table: its arguments name the table's count inputs (column
-- names or expressions over one row), compared between the old and new rows of an UPDATE.
-- Primary keys are compared with a FULL JOIN so that an UPDATE of `id` is a delete plus an
-- insert. The query is built per statement (EXECUTE sees the transition tables).
CREATE FUNCTION tally.feed_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint[];
BEGIN
    IF tally.feed_skips() THEN RETURN NULL; END IF;
    IF TG_OP = 'INSERT' THEN
        changed := ARRAY(SELECT id FROM new_rows);
    ELSIF TG_OP = 'DELETE' THEN
        changed := ARRAY(SELECT id FROM old_rows);
    ELSE
        EXECUTE format(
            'SELECT ARRAY(SELECT coalesce(n.id, o.id) FROM new_rows n FULL JOIN old_rows o ON o.id = n.id
                          WHERE n.id IS NULL OR o.id IS NULL OR (%s, NULL) IS DISTINCT FROM (%s, NULL))',
            (SELECT string_agg('n.' || a, ', ') FROM unnest(TG_ARGV) a),
            (SELECT string_agg('o.' || a, ', ') FROM unnest(TG_ARGV) a))
        INTO changed;
    END IF;
    PERFORM tally.feed_append(TG_TABLE_NAME, TG_OP, changed);
    RETURN NULL;
END
$$;

-- A TRUNCATE has no transition tables: tally rebuilds from the tables when it reads one.
CREATE FUNCTION tally.feed_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF tally.feed_skips() THEN RETURN NULL; END IF;
    PERFORM tally.feed_append(TG_TABLE_NAME, 'TRUNCATE', '{}');
    RETURN NULL;
END
$$;

-- The triggers: INSERT, UPDATE, DELETE with transition tables, and TRUNCATE, on every input,
-- each with the table's count inputs.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('main_project', $a$'default_filters_score_threshold'$a$),
        ('main_project_default_filters_include_taxa', $a$'project_id', 'taxon_id'$a$),
        ('main_project_default_filters_exclude_taxa', $a$'project_id', 'taxon_id'$a$),
        ('main_deployment', $a$'project_id'$a$),
        ('main_event', $a$'deployment_id', 'project_id'$a$),
        ('main_sourceimage', $a$'event_id', 'deployment_id', 'project_id', '"timestamp"', 'size'$a$),
        ('main_detection', $a$'source_image_id', 'occurrence_id', 'bbox IS NULL'$a$),
        ('main_occurrence', $a$'event_id', 'deployment_id', 'determination_id', 'determination_score'$a$),
        ('main_taxon', $a$'parents_json'$a$)
    ) AS v(tbl, inputs)
    LOOP
        EXECUTE format('CREATE TRIGGER tally_feed_insert AFTER INSERT ON public.%I
                        REFERENCING NEW TABLE AS new_rows
                        FOR EACH STATEMENT EXECUTE FUNCTION tally.feed_changes(%s)', t.tbl, t.inputs);
        EXECUTE format('CREATE TRIGGER tally_feed_update AFTER UPDATE ON public.%I
                        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                        FOR EACH STATEMENT EXECUTE FUNCTION tally.feed_changes(%s)', t.tbl, t.inputs);
        EXECUTE format('CREATE TRIGGER tally_feed_delete AFTER DELETE ON public.%I
                        REFERENCING OLD TABLE AS old_rows
                        FOR EACH STATEMENT EXECUTE FUNCTION tally.feed_changes(%s)', t.tbl, t.inputs);
        EXECUTE format('CREATE TRIGGER tally_feed_truncate AFTER TRUNCATE ON public.%I
                        FOR EACH STATEMENT EXECUTE FUNCTION tally.feed_truncate()', t.tbl);
    END LOOP;
END
$$;
