"""The replicated stack's Kafka (RUNSTATE_STACK=replicated): three combined broker+controller
KRaft nodes on loopback, from the same jars as the single node, each on its own ports.

    <root>/kafka-1, kafka-2, kafka-3     server.properties, data/, logs/ of each node
    <root>/kafka-cluster-security        the CA, one certificate per node, the SCRAM passwords
    <root>/kafka-cluster.id              the cluster id every node is formatted with

Every node is a controller (a quorum of 3: one may be down) and a broker. Topics get
replication factor 3 and min.insync.replicas=2 (runstate's ensure_topics reads them from
RUNSTATE_TOPIC_REPLICATION_FACTOR / _MIN_INSYNC_REPLICAS; the internal topics from the
broker settings below), and no out-of-sync replica ever becomes leader. Secured like the single
node: SASL_SSL (SCRAM) for clients, mutual TLS between brokers (INTERNAL) and to the
controllers, StandardAuthorizer with the same ACLs."""

from __future__ import annotations

from pathlib import Path

from .kafka import KafkaNode, kafka_cluster_id
from .ports import HOST, Ports
from .security import KafkaSecurity

NODES = 3
# Measured on this 2-core machine: 256 MiB of heap per node (RSS ~350-400 MB) is plenty once
# the log cleaner's dedupe buffer (128 MiB by default, on the heap) is made small.
NODE_HEAP = "-Xmx256m"
SECURITY_FOLDER = "kafka-cluster-security"


def node_names() -> list[str]:
    return [f"kafka-{i}" for i in range(1, NODES + 1)]


def cluster_id(root: Path) -> str:
    """The id every node is formatted with, kept so a node whose data is gone can rejoin."""
    path = root / "kafka-cluster.id"
    if not path.exists():
        path.write_text(kafka_cluster_id() + "\n")
    return path.read_text().strip()


def cluster_properties(node: int, port: int, internal_port: int, controller_port: int,
                       security: KafkaSecurity | None) -> dict[str, str]:
    """What a cluster node sets over a single node's properties."""
    props = {
        "default.replication.factor": "3",
        "min.insync.replicas": "2",
        "unclean.leader.election.enable": "false",
        "offsets.topic.replication.factor": "3",
        # Fewer partitions than the default 50: each is three replicas on a 2-core machine.
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "share.coordinator.state.topic.replication.factor": "3",
        "share.coordinator.state.topic.min.isr": "2",
        "log.cleaner.dedupe.buffer.size": "16777216",
        # A dead broker is fenced (its partitions led elsewhere) after 6 s instead of 9 s.
        "broker.session.timeout.ms": "6000",
        "broker.heartbeat.interval.ms": "1000",
    }
    if security is None:
        return props
    return {
        **props,
        "listeners": f"SASL_SSL://{HOST}:{port},INTERNAL://{HOST}:{internal_port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"SASL_SSL://{HOST}:{port},INTERNAL://{HOST}:{internal_port}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL",
        # Brokers replicate over mutual TLS, as the broker principal (User:CN=localhost, a super user).
        "inter.broker.listener.name": "INTERNAL",
        "listener.name.internal.ssl.client.auth": "required",
        "ssl.keystore.location": str(security.keystore_of(node)),
    }


def cluster_nodes(root: Path, ports: Ports, security: KafkaSecurity | None) -> list[KafkaNode]:
    """The three nodes, described (not started)."""
    names = node_names()
    voters = {i: ports[f"{name}-controller"] for i, name in enumerate(names, start=1)}
    bootstrap = ",".join(f"{HOST}:{ports[name]}" for name in names)
    cid = cluster_id(root)
    nodes = []
    for i, name in enumerate(names, start=1):
        nodes.append(KafkaNode(root / name, ports[name], voters[i], node_id=i, voters=voters, cluster_id=cid,
                               name=name, security=security, heap=NODE_HEAP, cluster_bootstrap=bootstrap,
                               extra=cluster_properties(i, ports[name], ports[f"{name}-internal"], voters[i],
                                                        security)))
    return nodes


def homes(root: Path) -> list[Path]:
    return [root / name for name in node_names()]
