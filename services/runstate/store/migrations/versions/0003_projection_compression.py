"""lz4 for the run projection's JSON too (the event payloads have it since 0001):
pglz was half of the server's CPU in writing a batch (make bench's profile).

Revision ID: 0003
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE task_runs ALTER COLUMN view SET COMPRESSION lz4")


def downgrade() -> None:
    op.execute("ALTER TABLE task_runs ALTER COLUMN view SET COMPRESSION pglz")
