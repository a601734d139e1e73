"""Events: a hash chained to the previous event of the stream (tamper evidence).

The table's owner can disable the append-only triggers and rewrite rows; the
chain makes such a rewrite visible to `runstate replay --verify`. Events stored
before this revision have no hash; the chain restarts after them.

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE events ADD COLUMN hash bytea")


def downgrade() -> None:
    op.execute("ALTER TABLE events DROP COLUMN hash")
