-- Of payments' indexes, only those that find an invoice lead with payment_code (issue 10).
--
-- Statements that find an invoice's payments ask for payment_code = $1 AND invoice_number = $2, and are
-- planned once for every code (a generic plan, after a few runs of a prepared statement or of PL/pgSQL).
-- Such a plan prices payment_code = $1 at the average code's rows, and in a merchant's table that is
-- about one: most codes are paid once. Any index that led with payment_code was then as cheap as the
-- invoice's, and PostgreSQL took the smallest, payments_notification_idx (payment_code,
-- notification_id), read the code's every payment and filtered on the invoice afterwards. A reusable
-- code with a history paid each new invoice by reading all of it, three times (the history read, and
-- again under the code's lock): with 3,000 payments before, 54,045 rows for six payments where a new
-- reusable code read 45 (tests/integration/test_plans.py). A code paid 5,000 times among 200,000 codes
-- paid once took 2.08 × a new code's PostgreSQL CPU per payment (bench/history.py; bench/README.md,
-- "Reusable codes' history"). Statistics do not mend it: the average is true, and a busy code is an
-- exception to it. (One that is a tenth of the payments or more is listed as such, and planned for.)
--
-- So no other index offers payment_code alone any more:
-- - the payment a notification made is found by notification_id (GET /v1/notifications joins on
--   p.payment_code = n.payment_code AND p.notification_id = n.id; the id alone finds it);
-- - the key payment_resolutions refers to is (id, payment_code), which holds the same pairs as
--   (payment_code, id) and still contains the code, and, leading with id, also serves every read in id
--   order that payments_id_idx served. That is one index fewer to write with every payment.
-- The primary key (payment_code, invoice_number, transaction_ref) and payments_one_normal_idx
-- (payment_code, invoice_number) are left, and both name the invoice next.
--
-- Migrations run in a transaction, so these are plain CREATE INDEX: while one builds, payments are not
-- recorded (a million payments take about a second each here); notifications wait, and DOKU retries
-- them. The new indexes are built first and the old ones dropped last: a DROP INDEX locks payments
-- against reads as well until the commit, and after it only the foreign key's check of
-- payment_resolutions (a row per resolved exception) remains.
CREATE INDEX payments_notification_id_idx ON payments (notification_id);
CREATE UNIQUE INDEX payments_id_code_idx ON payments (id, payment_code);

ALTER TABLE payment_resolutions DROP CONSTRAINT payment_resolutions_payment_code_payment_id_fkey;
DROP INDEX payments_code_id_idx;
ALTER TABLE payment_resolutions
    ADD CONSTRAINT payment_resolutions_payment_code_payment_id_fkey
    FOREIGN KEY (payment_code, payment_id) REFERENCES payments (payment_code, id);
DROP INDEX payments_notification_idx;
DROP INDEX payments_id_idx;
