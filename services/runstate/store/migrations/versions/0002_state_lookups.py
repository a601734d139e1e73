"""Lookups the HTTP gateway needs: a state by its id, a task run by its key.

Revision ID: 0002
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- The id of the state an event appended, so GET /task_run_states/{id}
        -- is an index lookup instead of a scan of the payloads.
        ALTER TABLE events ADD COLUMN state_id uuid;
        CREATE UNIQUE INDEX events_state_id ON events (state_id) WHERE state_id IS NOT NULL;
        -- Prefect answers a create with the existing run of the same
        -- (flow_run_id, task_key, dynamic_key).
        CREATE INDEX task_runs_key ON task_runs (flow_run_id, (view->>'task_key'), (view->>'dynamic_key'));
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX task_runs_key;
        DROP INDEX events_state_id;
        ALTER TABLE events DROP COLUMN state_id;
        """
    )
