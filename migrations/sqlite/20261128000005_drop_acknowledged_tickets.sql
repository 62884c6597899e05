-- A ticket is deleted as soon as apalis acknowledges it as done (as on PostgreSQL, where the
-- migration of the same name says why). A ticket only names a job record, which holds the
-- outcome; apalis keeps done tickets forever, so without this the embedded database grew by
-- one row per job run. Tickets that failed for good stay until the scheduler prunes them with
-- the settled job records.
CREATE TRIGGER IF NOT EXISTS tradeeon_drop_acknowledged_tickets
    AFTER UPDATE OF status ON Jobs
    WHEN NEW.status = 'Done' AND NEW.job_type = 'tradeeon'
BEGIN
    DELETE FROM Jobs WHERE id = NEW.id;
END;

-- What earlier releases left behind.
DELETE FROM Jobs WHERE job_type = 'tradeeon' AND status = 'Done';
