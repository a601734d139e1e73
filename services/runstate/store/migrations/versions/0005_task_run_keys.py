"""Task runs: the key as columns, the view as `json`, room for HOT updates.

Every decision rewrites its run's row. The (flow_run_id, task_key,
dynamic_key) index read its keys out of the view, so no rewrite could be a
HOT update and each one added an entry to every index on the table. The keys
never change after creation: as plain columns they leave the view free to
change without touching an index, and the free space left on each page
(fillfactor) lets the new row version stay beside the old one. The view itself
is written on every decision and only read back whole, so it is kept as the
text the service wrote, like the event payload (0004). The flow_run_id index
is dropped: the key index leads with that column.

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE task_runs ADD COLUMN task_key text, ADD COLUMN dynamic_key text;
        UPDATE task_runs SET task_key = view->>'task_key', dynamic_key = view->>'dynamic_key';
        DROP INDEX task_runs_key;
        DROP INDEX task_runs_flow_run_id;
        CREATE INDEX task_runs_key ON task_runs (flow_run_id, task_key, dynamic_key);
        ALTER TABLE task_runs ALTER COLUMN view TYPE json USING view::json;
        ALTER TABLE task_runs ALTER COLUMN view SET COMPRESSION lz4;
        ALTER TABLE task_runs SET (fillfactor = 70);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE task_runs RESET (fillfactor);
        ALTER TABLE task_runs ALTER COLUMN view TYPE jsonb USING view::jsonb;
        ALTER TABLE task_runs ALTER COLUMN view SET COMPRESSION lz4;
        DROP INDEX task_runs_key;
        CREATE INDEX task_runs_flow_run_id ON task_runs (flow_run_id);
        CREATE INDEX task_runs_key ON task_runs (flow_run_id, (view->>'task_key'), (view->>'dynamic_key'));
        ALTER TABLE task_runs DROP COLUMN task_key, DROP COLUMN dynamic_key;
        """
    )
