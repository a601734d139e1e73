"""Events: the source record's content digest, so a redelivery is recognised by
what the record holds and not only by where it sat.

After a command topic is recreated, its offsets are reset, or it is mirrored to
another cluster, new records take positions that earlier records had; matching
on (topic, partition, offset) alone answered them with old results. Rows written
before this revision have no digest and are matched as before.

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE events ADD COLUMN source_digest bytea;
        DROP INDEX events_source;
        CREATE UNIQUE INDEX events_source ON events (source_topic, source_partition, source_offset, source_digest)
            WHERE source_topic IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX events_source;
        ALTER TABLE events DROP COLUMN source_digest;
        CREATE UNIQUE INDEX events_source ON events (source_topic, source_partition, source_offset)
            WHERE source_topic IS NOT NULL;
        """
    )
