-- dipc's two database roles: an owner that runs migrations, and a least-privilege role that serves.
-- Replace the passwords (or use your platform's IAM roles) and, if you like, the names.

-- 1. As a superuser (or your cloud's admin role), connected to any database:
CREATE ROLE dipc_owner LOGIN PASSWORD 'change-me-owner';
CREATE ROLE dipc_app LOGIN PASSWORD 'change-me-app';
CREATE DATABASE dipc OWNER dipc_owner;
REVOKE ALL ON DATABASE dipc FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE dipc TO dipc_app;

-- 2. Still as the superuser, connected to the database dipc (psql: \c dipc):
ALTER SCHEMA public OWNER TO dipc_owner;

-- 3. As dipc_owner, connected to the database dipc, before the first `dipc migrate` (in the same
--    superuser session as 1 and 2, SET ROLE makes what follows dipc_owner's; connected as dipc_owner,
--    it changes nothing):
SET ROLE dipc_owner;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO dipc_app;
-- Tables, sequences and functions that later migrations create are granted as they appear:
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO dipc_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO dipc_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO dipc_app;
-- Those that exist already (if dipc_owner migrated before dipc_app existed):
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO dipc_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO dipc_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO dipc_app;

-- 4. Then: DATABASE_URL=postgresql://dipc_owner:…@host/dipc dipc migrate
--    and serve with DATABASE_URL=postgresql://dipc_app:…@host/dipc dipc serve
--    (`dipc doctor` as dipc_app checks that every privilege above is in place).
