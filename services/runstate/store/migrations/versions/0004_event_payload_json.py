"""The event payload is stored as `json`, the text the service wrote, not `jsonb`.

The log is written once per command and read rarely (replay, rebuild, a
republished result), so paying for jsonb's parse on every append bought
nothing: converting the ~5 kB payload to jsonb was the largest part of the
events INSERT (40 -> 74 us a row in a 1,000-row batch on this project's
bench machine). Stored as written, `payload->'result_event'` also returns the
exact bytes first published, so a republished result is byte-identical.

Revision ID: 0004
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ALTER TABLE rewrites the rows without firing the append-only triggers.
    op.execute(
        """
        ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json;
        ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE events ALTER COLUMN payload TYPE jsonb USING payload::jsonb;
        ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4;
        """
    )
