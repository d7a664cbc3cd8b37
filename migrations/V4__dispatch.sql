-- Bookkeeping of the worker gateway (`tally serve`'s HTTP API), in schema `tally`.

-- The rotation of claims: every serve of a job takes the next number, so the job with the
-- lowest turn is the one whose last serve is oldest.
CREATE SEQUENCE tally.job_dispatch_turn;

-- How often and when each async job was handed to a worker by a claim
-- (`GET /api/v2/jobs?ids_only=1…` or `/api/v2/jobs/next`), so that claims spread over the jobs
-- and none starves (Antenna's PK-order polling starved a job for ~500 s). A row is created the
-- first time a job is a claim candidate; rows of deleted jobs are harmless and never read again.
CREATE TABLE tally.job_dispatch (
    job_id          bigint      PRIMARY KEY,
    -- The job's place in the rotation: 0 until its first serve, then the value of
    -- tally.job_dispatch_turn drawn by its latest serve. Claims take the lowest first.
    turn            bigint      NOT NULL DEFAULT 0,
    -- Claims that returned this job. Also the optimistic guard of the claim statement: a row
    -- served by another poller since this poller's snapshot no longer matches and is skipped.
    served_count    bigint      NOT NULL DEFAULT 0,
    -- NULL until the first claim (for operators: when a job was last handed out).
    last_served_at  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
