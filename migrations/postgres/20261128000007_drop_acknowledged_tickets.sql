-- A ticket is deleted as soon as apalis acknowledges it as done.
--
-- A ticket only names a job record (`tradeeon_jobs`), which is what the API serves and what the
-- job's outcome is stored in; once apalis has marked the ticket `Done` nothing reads it again.
-- apalis keeps such tickets forever, though, and its acknowledgement statement
-- (`queries/task/handle_result.sql` in apalis-postgres 1.0) finds the tickets to mark through the
-- `lock_by` index: *every* ticket the worker has ever run, done or not. So each acknowledgement
-- read all of this worker's past tickets — ~3 ms per batch after 20,000 checks, the largest
-- single cost of a health sweep, growing without bound — and the table itself grew by one row
-- per job run, forever.
--
-- Tickets that failed for good (`Killed`, or `Failed` with no attempts left) are kept: they mean
-- a handler could not even settle its job record, which an operator may want to see. They are
-- rare, and the scheduler prunes them with the settled job records.
CREATE OR REPLACE FUNCTION public.tradeeon_drop_acknowledged_tickets() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    done text[] := ARRAY(SELECT id FROM acknowledged WHERE status = 'Done' AND job_type = 'tradeeon');
BEGIN
    -- apalis's other updates (fetching, locking) fire this too, with nothing to delete.
    IF cardinality(done) = 0 THEN
        RETURN NULL;
    END IF;
    -- Planned on each call (EXECUTE), by primary key: a plan cached while the queue was small
    -- would go on scanning the whole table once it has grown — a sweep enqueues tens of
    -- thousands of tickets in seconds.
    EXECUTE 'DELETE FROM apalis.jobs WHERE id = ANY ($1)' USING done;
    RETURN NULL;
END
$$;

-- One DELETE per acknowledgement batch (a statement-level trigger over the updated rows), not
-- one per ticket.
DROP TRIGGER IF EXISTS tradeeon_drop_acknowledged_tickets ON apalis.jobs;
CREATE TRIGGER tradeeon_drop_acknowledged_tickets
    AFTER UPDATE ON apalis.jobs
    REFERENCING NEW TABLE AS acknowledged
    FOR EACH STATEMENT
    EXECUTE FUNCTION public.tradeeon_drop_acknowledged_tickets();

-- What earlier releases left behind.
DELETE FROM apalis.jobs WHERE job_type = 'tradeeon' AND status = 'Done';
