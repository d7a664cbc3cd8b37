-- Job progress without recounting (issue 13). `tally.job_progress` holds, per job, the sums
-- of its `tally.job_image` rows that progress is made of (images with a row, failed ones,
-- detections and classifications inserted) and the latest time one of them was written. Each
-- ingest batch then reads one row per job instead of aggregating every image the job has had
-- a result for, which took ~50 ms for a job 100,000 images in and grew with the job.
--
-- Statement-level triggers on `tally.job_image` keep the sums exact in the transaction that
-- changes it, whoever writes it (ingest, the lost-images sweep, an operator's DELETE). A
-- trigger's upsert locks the job's row here until the transaction ends, in job id order;
-- every writer of `tally.job_image` then locks the job's row in `jobs_job` (the progress
-- update, in id order), so they all take their locks in one order and never wait for each
-- other in a circle.
CREATE TABLE tally.job_progress (
    job_id          bigint      PRIMARY KEY,
    processed       bigint      NOT NULL DEFAULT 0,
    failed          bigint      NOT NULL DEFAULT 0,
    detections      bigint      NOT NULL DEFAULT 0,
    classifications bigint      NOT NULL DEFAULT 0,
    -- The latest `last_seen` of the job's rows; a DELETE does not move it back.
    last_seen       timestamptz
);

-- Adds each row of the statement's transition tables to its job's sums (`new_rows` with +1,
-- `old_rows` with -1); a TRUNCATE empties the sums.
CREATE FUNCTION tally.job_progress_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO tally.job_progress AS p (job_id, processed, failed, detections, classifications, last_seen)
        SELECT job_id, count(*), count(*) FILTER (WHERE failed), sum(detections), sum(classifications),
               max(last_seen)
        FROM new_rows GROUP BY job_id ORDER BY job_id
        ON CONFLICT (job_id) DO UPDATE SET
            processed = p.processed + EXCLUDED.processed,
            failed = p.failed + EXCLUDED.failed,
            detections = p.detections + EXCLUDED.detections,
            classifications = p.classifications + EXCLUDED.classifications,
            last_seen = greatest(p.last_seen, EXCLUDED.last_seen);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO tally.job_progress AS p (job_id, processed, failed, detections, classifications, last_seen)
        SELECT job_id, sum(s), coalesce(sum(s) FILTER (WHERE failed), 0), sum(s * detections),
               sum(s * classifications), max(last_seen) FILTER (WHERE s = 1)
        FROM (SELECT 1 AS s, job_id, failed, detections, classifications, last_seen FROM new_rows
              UNION ALL
              SELECT -1, job_id, failed, detections, classifications, NULL FROM old_rows) AS d
        GROUP BY job_id ORDER BY job_id
        ON CONFLICT (job_id) DO UPDATE SET
            processed = p.processed + EXCLUDED.processed,
            failed = p.failed + EXCLUDED.failed,
            detections = p.detections + EXCLUDED.detections,
            classifications = p.classifications + EXCLUDED.classifications,
            last_seen = greatest(p.last_seen, EXCLUDED.last_seen);
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE tally.job_progress AS p SET
            processed = p.processed - d.processed,
            failed = p.failed - d.failed,
            detections = p.detections - d.detections,
            classifications = p.classifications - d.classifications
        FROM (SELECT job_id, count(*) AS processed, count(*) FILTER (WHERE failed) AS failed,
                     sum(detections) AS detections, sum(classifications) AS classifications
              FROM old_rows GROUP BY job_id) AS d
        WHERE p.job_id = d.job_id;
    ELSE
        DELETE FROM tally.job_progress;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_progress_insert AFTER INSERT ON tally.job_image
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally.job_progress_add();
CREATE TRIGGER job_progress_update AFTER UPDATE ON tally.job_image
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally.job_progress_add();
CREATE TRIGGER job_progress_delete AFTER DELETE ON tally.job_image
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally.job_progress_add();
CREATE TRIGGER job_progress_truncate AFTER TRUNCATE ON tally.job_image
    FOR EACH STATEMENT EXECUTE FUNCTION tally.job_progress_add();

-- The rows already there. The triggers, created first, hold every writer of `tally.job_image`
-- off until this migration commits, so none is counted twice or missed.
INSERT INTO tally.job_progress (job_id, processed, failed, detections, classifications, last_seen)
SELECT job_id, count(*), count(*) FILTER (WHERE failed), sum(detections), sum(classifications), max(last_seen)
FROM tally.job_image GROUP BY job_id;
