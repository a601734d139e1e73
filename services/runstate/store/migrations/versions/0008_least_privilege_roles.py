"""Least privilege: what each of runstate's login roles may do.

    runstate_consumer  events: SELECT, INSERT (the append-only triggers stay);
                       projections: SELECT, INSERT, UPDATE, DELETE, TRUNCATE (it also runs
                       `runstate rebuild`, which refills them)
    runstate_gateway   SELECT on everything (its writes go through commands)
    runstate_auditor   SELECT on everything (history, replay --verify, backfill's reads)

The roles are cluster-wide and made by whoever administers the server (the local stack, or
an operator: see the README's "Running it securely"); this revision grants to those that
exist and leaves out the others, so a server with a single service role keeps working. The
owner (who runs this) is never one of them. Tables a later revision creates are readable by
the three through default privileges; write access stays explicit, revision by revision.

Revision ID: 0008
"""

from alembic import context, op
from sqlalchemy import text

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CONSUMER = "runstate_consumer"
READERS = ("runstate_gateway", "runstate_auditor")
EVENTS = "events"
PROJECTIONS = "task_runs, flow_runs, task_cache, tag_concurrency_limits, tag_leases"


def _existing(roles: tuple[str, ...]) -> list[str]:
    rows = op.get_bind().execute(text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:r)"), {"r": list(roles)})
    found = {r[0] for r in rows}
    return [r for r in roles if r in found]


def upgrade() -> None:
    roles = _existing((CONSUMER, *READERS))
    for role in (CONSUMER, *READERS):
        if role not in roles:
            context.config.print_stdout(f"0008: role {role} does not exist: no grants for it (create it, then re-apply 0008)")
    for role in roles:
        # Whatever an earlier revision gave the role (0001 grants writes to DATABASE_URL's role).
        op.execute(f"REVOKE ALL ON {EVENTS}, {PROJECTIONS} FROM {role}")
        if role == CONSUMER:
            op.execute(f"GRANT SELECT, INSERT ON {EVENTS} TO {role}")
            op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {PROJECTIONS} TO {role}")
        else:
            op.execute(f"GRANT SELECT ON {EVENTS}, {PROJECTIONS} TO {role}")
        op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {role}")


def downgrade() -> None:
    for role in _existing((CONSUMER, *READERS)):
        op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM {role}")
        if role != CONSUMER:  # the consumer keeps what 0001 gives the service's role
            op.execute(f"REVOKE ALL ON {EVENTS}, {PROJECTIONS} FROM {role}")
