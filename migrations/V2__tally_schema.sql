-- tally's own objects, always in schema `tally` (created by `tally migrate` before this runs).

-- The taxon part of passes(o) (SPEC §2) for a determination under project `project`:
-- incl_ok AND excl_ok, through the determination's ancestors in parents_json.
CREATE OR REPLACE FUNCTION tally.taxon_passes(determination bigint, project bigint)
RETURNS boolean
LANGUAGE sql STABLE
AS $$
  SELECT (
      NOT EXISTS (SELECT 1 FROM main_project_default_filters_include_taxa i WHERE i.project_id = project)
      OR (determination IS NOT NULL AND EXISTS (
        SELECT 1 FROM main_project_default_filters_include_taxa i
        LEFT JOIN main_taxon t ON t.id = determination
        WHERE i.project_id = project
          AND (i.taxon_id = determination
               OR t.parents_json @> jsonb_build_array(jsonb_build_object('id', i.taxon_id))))))
    AND (
      determination IS NULL
      OR NOT EXISTS (
        SELECT 1 FROM main_project_default_filters_exclude_taxa x
        LEFT JOIN main_taxon t ON t.id = determination
        WHERE x.project_id = project
          AND (x.taxon_id = determination
               OR t.parents_json @> jsonb_build_array(jsonb_build_object('id', x.taxon_id)))))
$$;

-- passes(o) of SPEC §2 for an occurrence's determination and score under project `project`.
-- A NULL project filters nothing; a project id without a row has a NULL threshold, so nothing
-- passes. `tally verify` evaluates the same definition through a per-(project, determination)
-- table of taxon_passes; the dataflow never calls either.
CREATE OR REPLACE FUNCTION tally.passes(determination bigint, score double precision, project bigint)
RETURNS boolean
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN project IS NULL THEN true ELSE
    coalesce((SELECT score >= p.default_filters_score_threshold FROM main_project p WHERE p.id = project), false)
    AND tally.taxon_passes(determination, project)
  END
$$;
