-- Run once by the postgres image on the primary's new data volume (deploy/compose.yaml), as the
-- image's superuser: runstate's roles, none a superuser. The migrations (run as the owner)
-- grant each login role its privileges (revision 0008). The passwords come from the
-- container's environment (compose variables RUNSTATE_*_PASSWORD; psql 15's \getenv), so
-- none is written here; see the README's "Running it securely" for TLS.
\getenv owner_password RUNSTATE_OWNER_PASSWORD
\getenv consumer_password RUNSTATE_CONSUMER_PASSWORD
\getenv gateway_password RUNSTATE_GATEWAY_PASSWORD
\getenv auditor_password RUNSTATE_AUDITOR_PASSWORD
CREATE ROLE runstate_owner LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD :'owner_password';
CREATE ROLE runstate_consumer LOGIN PASSWORD :'consumer_password';
CREATE ROLE runstate_gateway LOGIN PASSWORD :'gateway_password';
CREATE ROLE runstate_auditor LOGIN PASSWORD :'auditor_password';
CREATE DATABASE runstate OWNER runstate_owner;
REVOKE ALL ON DATABASE runstate FROM PUBLIC;
GRANT CONNECT ON DATABASE runstate TO runstate_consumer, runstate_gateway, runstate_auditor;
GRANT TEMPORARY ON DATABASE runstate TO runstate_consumer;
