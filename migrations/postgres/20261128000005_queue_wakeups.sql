-- Workers are woken after an enqueue commits, not from inside it.
--
-- apalis-postgres's `notify_workers` trigger calls pg_notify for every ticket inside the
-- enqueueing transaction. PostgreSQL serializes the commits of all transactions that issued a
-- NOTIFY (they hold one global lock through their commit's WAL flush), so every request that
-- enqueued a job committed one at a time: about one fsync each, a few hundred per second in all.
-- The store now sends the same notification after the commit, from a background task, with
-- synchronous_commit off (shared/src/store/wakeups.rs); workers also poll, so nothing depends on
-- a wake-up arriving.
DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs;
