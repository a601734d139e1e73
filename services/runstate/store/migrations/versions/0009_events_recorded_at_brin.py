"""Events: the recorded_at index as BRIN, not a B-tree.

Only range scans read it (backfill --since, rebuild's catch-up pass), and the
log is appended in time order, so a block-range summary finds the same rows
while a B-tree entry cost every event about 30 bytes on disk and its upkeep on
every insert. Task-run events written before the lean payload (events.py,
LegacyTaskRunEventPayload) are kept as they are: every reader accepts both.

Revision ID: 0009
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS events_recorded_at")
    op.execute("CREATE INDEX events_recorded_at ON events USING brin (recorded_at)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS events_recorded_at")
    op.execute("CREATE INDEX events_recorded_at ON events (recorded_at)")
