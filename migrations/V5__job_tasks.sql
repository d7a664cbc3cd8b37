-- Bookkeeping of the job monitor (`tally serve`), in schema `tally`.

-- The images a job was created for, one row per (job, image), written by `tally job create`
-- before its tasks are published. The job monitor marks the images of a stalled job that have
-- no `tally.job_image` row as failed (Antenna's `mark_lost_images_failed`), so it must know the
-- exact set; for jobs created by Antenna (no rows here) it reads the tasks left in the job's
-- stream instead. Rows are kept after the job ends, like `tally.job_image`.
CREATE TABLE tally.job_task (
    job_id   bigint NOT NULL,
    image_id bigint NOT NULL,
    PRIMARY KEY (job_id, image_id)
);
