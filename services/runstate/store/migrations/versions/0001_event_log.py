"""Event log, projections, cache and tag concurrency.

Revision ID: 0001
"""

from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    app_role = context.config.attributes.get("app_role")
    op.execute(
        """
        CREATE TABLE events (
            stream_id        uuid        NOT NULL,
            seq              bigint      NOT NULL CHECK (seq > 0),
            stream_type      text        NOT NULL CHECK (stream_type IN ('task_run', 'flow_run')),
            event_type       text        NOT NULL,
            command_id       uuid        NOT NULL,
            transition_id    uuid,
            status           text        CHECK (status IN ('ACCEPT', 'REJECT', 'ABORT', 'WAIT')),
            state_type       text,
            state_name       text,
            payload          jsonb       NOT NULL,
            source_topic     text,
            source_partition integer,
            source_offset    bigint,
            recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (stream_id, seq)
        );
        -- A redelivered Kafka record is recognised by where it came from.
        CREATE UNIQUE INDEX events_source ON events (source_topic, source_partition, source_offset)
            WHERE source_topic IS NOT NULL;
        -- A transition is decided finally at most once; WAIT is not final.
        CREATE UNIQUE INDEX events_final_transition ON events (stream_id, transition_id)
            WHERE transition_id IS NOT NULL AND status IN ('ACCEPT', 'REJECT', 'ABORT');
        CREATE INDEX events_recorded_at ON events (recorded_at);
        -- Payloads are ~6 kB of JSON; lz4 compresses them at a fraction of pglz's cost.
        ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4;

        CREATE FUNCTION events_refuse_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'events is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$;
        CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION events_refuse_rewrite();
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
            FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_rewrite();

        CREATE TABLE task_runs (
            id          uuid PRIMARY KEY,
            last_seq    bigint NOT NULL,
            flow_run_id uuid,
            state_type  text,
            state_name  text,
            view        jsonb  NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX task_runs_flow_run_id ON task_runs (flow_run_id);

        CREATE TABLE flow_runs (
            id         uuid PRIMARY KEY,
            last_seq   bigint NOT NULL,
            state_type text,
            view       jsonb  NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );

        CREATE TABLE task_cache (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            cache_key        text        NOT NULL,
            cache_expiration timestamptz,
            state_id         uuid        NOT NULL,
            state            jsonb       NOT NULL,
            created          timestamptz NOT NULL
        );
        CREATE INDEX task_cache_key_created ON task_cache (cache_key, created DESC);

        CREATE TABLE tag_concurrency_limits (
            tag                        text PRIMARY KEY,
            "limit"                    integer NOT NULL CHECK ("limit" >= 0),
            active                     boolean NOT NULL DEFAULT true,
            active_slots               integer NOT NULL DEFAULT 0 CHECK (active_slots >= 0),
            avg_slot_occupancy_seconds double precision DEFAULT 2.0,
            updated_at                 timestamptz NOT NULL DEFAULT clock_timestamp()
        );

        CREATE TABLE tag_leases (
            id          uuid PRIMARY KEY,
            task_run_id uuid    NOT NULL,
            tags        text[]  NOT NULL,
            slots       integer NOT NULL DEFAULT 1
        );
        CREATE INDEX tag_leases_task_run_id ON tag_leases (task_run_id);
        """
    )
    if app_role:
        role = '"' + app_role.replace('"', '""') + '"'
        op.execute(
            f"""
            REVOKE ALL ON events FROM {role};
            GRANT SELECT, INSERT ON events TO {role};
            GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE
                ON task_runs, flow_runs, task_cache, tag_concurrency_limits, tag_leases TO {role};
            """
        )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE tag_leases, tag_concurrency_limits, task_cache, flow_runs, task_runs;
        DROP TRIGGER events_no_truncate ON events;
        DROP TRIGGER events_no_update_delete ON events;
        DROP TABLE events;
        DROP FUNCTION events_refuse_rewrite();
        """
    )
