-- reconciliation's index on the invoice number names the code next (issue 10).
--
-- A payment locks its invoice's reconciliation row and settles it, and a quote upserts it, each by
-- payment_code = $1 AND invoice_number = $2, the primary key. A generic plan prices invoice_number = $2
-- at the average number's rows, about one, so reconciliation_invoice_idx (invoice_number) cost the
-- same as the key, and PostgreSQL took it. But a reusable code's invoices are numbered from its base
-- (TOPUP-1, TOPUP-2, ...), and codes made alike share those numbers: each such lookup read every row
-- of the number. With 200 codes sharing them, six payments of a new code read 2,436 reconciliation
-- rows, about 400 each (tests/integration/test_plans.py), and the settling inside a batch's statement
-- went that way even under custom plans, since its invoice comes from the row being recorded.
--
-- An index on (invoice_number, payment_code) finds the one row by both, whichever of it and the key a
-- plan takes. It still serves the check by hand, which names the invoice only and lists its rows by
-- code (store/reconciliation.py), now in the index's order.
--
-- A plain CREATE INDEX in the migration's transaction: quotes, which upsert this table, wait while it
-- builds (a second or two for a million invoices here). It is built before the old one is dropped.
CREATE INDEX reconciliation_invoice_code_idx ON reconciliation (invoice_number, payment_code);
DROP INDEX reconciliation_invoice_idx;
