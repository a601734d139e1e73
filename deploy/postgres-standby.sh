#!/bin/bash
# The standby's command (deploy/compose.yaml), run as root by the postgres image: on a new
# volume, copy the primary with pg_basebackup -R (standby.signal, primary_conninfo and the
# slot's name go into the copy), then start PostgreSQL through the image's own entrypoint,
# which hands the folder to the postgres user and finds it initialised. Arguments: postgres's.
set -euo pipefail
primary="${RUNSTATE_PRIMARY_HOST:-postgres-primary}"

copy() {
    gosu postgres pg_basebackup -h "$primary" -p 5432 -U runstate_replicator -D "$PGDATA.partial" \
        -X stream -R -c fast -S standby1 "$@"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    parent="$(dirname "$PGDATA")"
    chown postgres:postgres "$parent"
    rm -rf "$PGDATA.partial"
    until pg_isready -q -h "$primary" -p 5432; do sleep 1; done
    # -C creates the slot that keeps the primary's WAL for this standby; a standby rebuilt on
    # a new volume finds the slot there already and takes it over.
    if ! copy -C; then
        rm -rf "$PGDATA.partial"
        copy
    fi
    # Moved in whole, so a copy cut off half-way is never taken for a data folder.
    rm -rf "$PGDATA"
    mv "$PGDATA.partial" "$PGDATA"
fi
exec docker-entrypoint.sh postgres "$@"
