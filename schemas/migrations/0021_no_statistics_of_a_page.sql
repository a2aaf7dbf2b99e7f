-- Autovacuum leaves the tables that every notification and inquiry reads by key alone until about a
-- thousand of their rows have changed (issue 10).
--
-- A server keeps its statements' plans for as long as its connections live, until the tables they read
-- are analyzed or vacuumed again. Autovacuum analyzes a table once 50 rows have changed, and vacuums it
-- once 50 are dead: in a new database that can be while the table holds a page or less, and PostgreSQL
-- then plans a lookup by key in it as a sequential scan (a page is cheaper to read whole than through
-- an index), or, vacuumed at 200 rows but not yet analyzed, the lookup of a code's normal payment as a
-- scan of payments_kind_id_idx for kind = 'normal' (no statistics: 'normal' looks rare). The plan stays while the table grows, for up to autovacuum's next visit a minute later:
-- the read of a notification's history (dipc_payment_history) scanned every payment recorded so far,
-- once per notification, and a benchmark's first notification rounds fell to 584 a second from 1,600
-- (bench/README.md, "A floor under the sequencing's reads"). Plans made before any analyze read these
-- tables through their indexes, and so do those made once they hold a few hundred rows.
--
-- Past the first thousand rows, autovacuum goes on as before: the thresholds add to its 10 % (analyze)
-- and 20 % (vacuum) of the table, so a large table is analyzed and vacuumed as often as it was. A table
-- that receives fewer rows than that a day is small enough to read whole.
ALTER TABLE payments SET (autovacuum_analyze_threshold = 1000, autovacuum_vacuum_threshold = 1000);
ALTER TABLE notifications SET (autovacuum_analyze_threshold = 1000, autovacuum_vacuum_threshold = 1000);
ALTER TABLE inquiries SET (autovacuum_analyze_threshold = 1000, autovacuum_vacuum_threshold = 1000);
ALTER TABLE reconciliation SET (autovacuum_analyze_threshold = 1000, autovacuum_vacuum_threshold = 1000);
ALTER TABLE events SET (autovacuum_analyze_threshold = 1000, autovacuum_vacuum_threshold = 1000);
