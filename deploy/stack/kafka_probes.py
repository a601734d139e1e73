"""Readiness checks that talk to Kafka as a client does (aiokafka: run the stack with the
project's virtualenv Python)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .output import StackError


def _quiet() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def kafka_probe(bootstrap: str, options: dict[str, Any] | None = None,
                group: str = "runstate-readiness") -> str | None:
    """None when the broker answers a metadata request and can coordinate a consumer group,
    else a short reason. `options`: aiokafka's security keyword arguments (the admin's login)."""
    try:
        from aiokafka.client import AIOKafkaClient, CoordinationType
    except ImportError:
        raise StackError("aiokafka is not importable: run deploy/stack with the project's "
                         "virtualenv Python (make up)") from None
    _quiet()

    async def probe() -> str | None:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000,
                                client_id="runstate-stack-readiness", **(options or {}))
        try:
            await asyncio.wait_for(client.bootstrap(), 10)
            if not client.cluster.brokers():
                return "metadata lists no broker"
            await asyncio.wait_for(client.coordinator_lookup(CoordinationType.GROUP, group), 10)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            return f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    return asyncio.run(probe())


def kafka_group_stable(bootstrap: str, group: str, options: dict[str, Any] | None = None) -> bool:
    """True when consumer group `group` is Stable with at least one member."""
    from aiokafka.admin import AIOKafkaAdminClient

    _quiet()

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **(options or {}))
        try:
            await admin.start()
            for response in await asyncio.wait_for(admin.describe_consumer_groups([group]), 10):
                for g in response.groups:  # (error_code, group_id, state, protocol_type, protocol, members, ...)
                    if g[1] == group and g[0] == 0 and g[2] == "Stable" and len(g[5]) > 0:
                        return True
            return False
        except Exception:  # noqa: BLE001 - not ready yet
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    return asyncio.run(probe())
