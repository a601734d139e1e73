#!/bin/bash
# Run once by the postgres image on the primary's new data volume (deploy/compose.yaml), after
# postgres-init.sql: the standby's replication login, and the primary's rule that a commit
# returns only once the standby has it. The image runs this file or sources it, so no `exit`.
# synchronous_standby_names goes through ALTER SYSTEM, read at the real start after the init:
# on the command line it would also hold the image's init server, whose commits no standby can
# ever confirm (it listens on no TCP port).
set -e
psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv replication_password RUNSTATE_REPLICATION_PASSWORD
CREATE ROLE runstate_replicator LOGIN REPLICATION PASSWORD :'replication_password';
ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (standby1)';
SQL
# "all" in pg_hba's database column does not cover replication connections.
echo "host replication runstate_replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
