"""The local runstate stack: a single-node Kafka (KRaft) and a throwaway PostgreSQL cluster,
started as plain processes from the repository, plus the long-running runstate services.

    python deploy/stack up       start everything (or report "already up"), write .runstate/env
    python deploy/stack down     stop exactly the processes that `up` recorded
    python deploy/stack status   show what is running (exit 0 = all up, 3 = not up)
    python deploy/stack env      print .runstate/env (shell `export` lines, passwords hidden)

Run it with the project's virtualenv Python (`make up` does): the Kafka readiness check uses
aiokafka; `down` and `status` need only the standard library. In Python, with deploy/ on the
path: `from stack import LocalStack`.

RUNSTATE_STACK=replicated starts three Kafka nodes (cluster) and a PostgreSQL primary with a
synchronous standby (standby) instead of one of each.

Modules: local (LocalStack: up, down, status, restart, kill, start_again), kafka and postgres
(one server each), cluster (three Kafka nodes), standby (primary and standby, promote),
security (the secured Kafka: CA and certificates, SCRAM users, ACLs; RUNSTATE_STACK_SECURITY),
services (the runstate processes), external (servers named by the environment), processes
(start and stop), records (state.json and friends), envfile (.runstate/env), ports, layout
(where files go), tools (java, mvn, PostgreSQL binaries), kafka_probes, output, cli.
"""

from .layout import DEFAULT_ROOT, REPO
from .local import LocalStack
from .output import StackError
from .ports import free_port

__all__ = ["DEFAULT_ROOT", "REPO", "LocalStack", "StackError", "free_port"]
