-- Task acks that JetStream did not confirm when their result was saved (a timeout, or no
-- responder while the job's consumer still exists). The result itself is acked at once, so no
-- result ever waits on the results consumer for its task (no head-of-line blocking); ingest
-- retries these acks with backoff, and after `--task-ack-attempts` records a dead letter
-- (`task_ack_failed`) and gives up. A task whose consumer or stream is gone is never stored
-- here: nothing is left to ack.
CREATE TABLE tally.task_ack_retry (
    -- The task's ack subject ($JS.ACK.job_{id}.job-{id}-consumer.…).
    reply_subject    text        PRIMARY KEY,
    job_id           bigint      NOT NULL,
    -- Where the result is in the results stream (for the dead letter if the ack never goes).
    results_subject  text        NOT NULL,
    results_sequence bigint,
    attempts         integer     NOT NULL DEFAULT 1,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL,
    last_error       text        NOT NULL
);

CREATE INDEX task_ack_retry_due ON tally.task_ack_retry (next_attempt_at);
