"""The replicated stack's description (RUNSTATE_STACK=replicated): what the Kafka nodes and the
PostgreSQL pair are configured with, and the multi-host URLs its clients get. Pure: nothing is
started (tests/faults/test_replicated.py runs the stack itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from runstate.database_urls import hosts, libpq_dsn, masked
from stack import StackError
from stack.cluster import cluster_nodes, cluster_properties
from stack.local import stack_shape
from stack.pg_roles import url
from stack.ports import Ports
from stack.security import KafkaSecurity
from stack.standby import SYNC_NAMES, replicated_postgres


def test_the_shape_comes_from_runstate_stack() -> None:
    assert stack_shape({}) == "single"
    assert stack_shape({"RUNSTATE_STACK": " Replicated "}) == "replicated"
    with pytest.raises(StackError):
        stack_shape({"RUNSTATE_STACK": "cluster"})


def test_a_multi_host_url_becomes_libpq_host_and_port_lists() -> None:
    u = url("runstate_consumer", "p@ss/w'rd", "127.0.0.1", [5433, 5434], Path("/x/ca.pem"))
    assert hosts(u) == [("127.0.0.1", 5433), ("127.0.0.1", 5434)]
    params = conninfo_to_dict(libpq_dsn(u))
    assert params["host"] == "127.0.0.1,127.0.0.1" and params["port"] == "5433,5434"
    assert params["target_session_attrs"] == "read-write" and params["sslmode"] == "verify-full"
    assert params["password"] == "p@ss/w'rd" and params["dbname"] == "runstate"
    assert "p@ss" not in masked(u)
    # a plain URL is unchanged
    assert conninfo_to_dict(libpq_dsn(url("r", "p", "127.0.0.1", 5432, None)))["port"] == "5432"


def test_libpq_style_host_and_port_lists_are_read_too() -> None:
    """The form compose files and libpq's docs use: `?host=a,b&port=p1,p2` (or one port for all)."""
    u = "postgresql+psycopg://r:p@/db?host=pg-a,pg-b&port=5432,5433&target_session_attrs=read-write"
    assert hosts(u) == [("pg-a", 5432), ("pg-b", 5433)]
    params = conninfo_to_dict(libpq_dsn(u))
    assert (params["host"], params["port"], params["target_session_attrs"]) == ("pg-a,pg-b", "5432,5433", "read-write")
    assert hosts("postgresql+psycopg://r:p@/db?host=pg-a,pg-b&port=5432") == [("pg-a", 5432), ("pg-b", 5432)]


def test_three_nodes_with_replication_factor_3_min_isr_2_and_no_unclean_election(tmp_path: Path) -> None:
    security = KafkaSecurity(tmp_path, {"admin": "a", "runstate-service": "s", "runstate-worker": "w"})
    nodes = cluster_nodes(tmp_path, Ports(), security)
    assert [n.node_id for n in nodes] == [1, 2, 3] and len({n.cluster_id for n in nodes}) == 1
    assert len({n.port for n in nodes}) == 3
    for node in nodes:
        props = node.properties()
        assert props["process.roles"] == "broker,controller"
        assert len(props["controller.quorum.voters"].split(",")) == 3
        for key in ("default.replication.factor", "offsets.topic.replication.factor",
                    "transaction.state.log.replication.factor"):
            assert props[key] == "3", key
        assert props["min.insync.replicas"] == "2" and props["transaction.state.log.min.isr"] == "2"
        assert props["unclean.leader.election.enable"] == "false"
        # clients on SASL_SSL, brokers among themselves and to the controllers on mutual TLS
        assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL"
        assert props["inter.broker.listener.name"] == "INTERNAL"
        assert props["ssl.keystore.location"] == str(security.keystore_of(node.node_id))
        env = node.env()
        assert env["KAFKA_BOOTSTRAP_SERVERS"].count(",") == 2
        assert env["RUNSTATE_TOPIC_REPLICATION_FACTOR"] == "3" and env["RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS"] == "2"
    # RUNSTATE_STACK_SECURITY=plaintext: the same durability, the single node's PLAINTEXT listeners
    plain = cluster_properties(1, 1, 2, 3, None)
    assert plain["min.insync.replicas"] == "2" and "listeners" not in plain


def test_the_postgres_pair_names_either_server_as_the_synchronous_standby(tmp_path: Path) -> None:
    primary, standby = replicated_postgres(tmp_path, Ports())
    assert primary.primary and not standby.primary and primary.peer is standby and standby.peer is primary
    for server in (primary, standby):
        options = " ".join(server.extra_options)
        assert f"synchronous_standby_names={SYNC_NAMES}" in options
        assert "replication runstate_replicator 127.0.0.1/32 scram-sha-256" in server.extra_hba
        assert server.client_ports == [primary.port, standby.port]  # postgres-a first: the primary of a new pair
    assert SYNC_NAMES == "FIRST 1 (pg_a, pg_b)"
