-- Run once by the postgres image when its data volume is new (deploy/compose.yaml), as the
-- image's superuser: runstate's roles, none a superuser. The migrations (run as the owner)
-- grant each login role its privileges (revision 0008). Demo passwords: change them for
-- anything but a laptop, and see the README's "Running it securely" for TLS.
CREATE ROLE runstate_owner LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD 'runstate';
CREATE ROLE runstate_consumer LOGIN PASSWORD 'runstate';
CREATE ROLE runstate_gateway LOGIN PASSWORD 'runstate';
CREATE ROLE runstate_auditor LOGIN PASSWORD 'runstate';
CREATE DATABASE runstate OWNER runstate_owner;
REVOKE ALL ON DATABASE runstate FROM PUBLIC;
GRANT CONNECT ON DATABASE runstate TO runstate_consumer, runstate_gateway, runstate_auditor;
GRANT TEMPORARY ON DATABASE runstate TO runstate_consumer;
