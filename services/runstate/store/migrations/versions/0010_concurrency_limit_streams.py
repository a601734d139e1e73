"""Concurrency-limit changes in the event log: a `concurrency_limit` stream per tag.

Limit changes are commands decided by the consumer (set_concurrency_limit,
delete_concurrency_limit); each is an event of the stream `limit_id(tag)` and
updates tag_concurrency_limits, so the gateway stays read only. No grant
changes: the consumer already writes the log and the projections, the gateway
and the auditor only read. The CHECK is added NOT VALID and then validated, so
the long scan of a big log holds no lock that stops the consumer's appends.

Revision ID: 0010
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE events DROP CONSTRAINT events_stream_type_check")
    op.execute(
        "ALTER TABLE events ADD CONSTRAINT events_stream_type_check"
        " CHECK (stream_type IN ('task_run', 'flow_run', 'concurrency_limit')) NOT VALID"
    )
    op.execute("ALTER TABLE events VALIDATE CONSTRAINT events_stream_type_check")


def downgrade() -> None:
    # Refused while the log holds limit events: the log is append-only, they stay.
    op.execute("ALTER TABLE events DROP CONSTRAINT events_stream_type_check")
    op.execute(
        "ALTER TABLE events ADD CONSTRAINT events_stream_type_check CHECK (stream_type IN ('task_run', 'flow_run'))"
    )
