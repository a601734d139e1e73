"""Database URLs. Settings carry SQLAlchemy URLs (`postgresql+psycopg://user:pass@host:port/db`),
often as a SecretStr; psycopg and libpq take a conninfo string instead. Every conversion
between the two forms is here.

Multi-host URLs (a primary and its standby) keep their hosts in the query, as SQLAlchemy's
psycopg dialect reads them (`postgresql+psycopg://u:p@/db?host=a:5432&host=b:5433&target_session_attrs=read-write`);
libpq wants `host=a,b port=5432,5433`: libpq_dsn converts, `hosts` lists them."""

from __future__ import annotations

from typing import Any

from psycopg.conninfo import make_conninfo
from pydantic import SecretStr
from sqlalchemy.engine import URL, make_url

DatabaseURL = str | SecretStr | URL


def parse(url: DatabaseURL) -> URL:
    """The URL as SQLAlchemy's URL object (whose str() hides the password)."""
    if isinstance(url, URL):
        return url
    if isinstance(url, SecretStr):
        url = url.get_secret_value()
    return make_url(url)


def reveal(url: DatabaseURL) -> str:
    """The SQLAlchemy URL as text, password included: for engines and child processes' env."""
    return parse(url).render_as_string(hide_password=False)


def masked(url: DatabaseURL) -> str:
    """The SQLAlchemy URL as text with the password replaced by ***: for messages."""
    return parse(url).render_as_string(hide_password=True)


def with_database(url: DatabaseURL, database: str) -> str:
    """The same server and role, another database."""
    return reveal(parse(url).set(database=database))


def libpq_dsn(url: DatabaseURL) -> str:
    """The libpq conninfo string (psycopg.connect, psycopg_pool) of a SQLAlchemy URL. Built from
    the parts, so that any character in a password is quoted as libpq expects."""
    u = parse(url)
    parts: dict[str, Any] = {"host": u.host, "port": u.port, "user": u.username, "password": u.password,
                                "dbname": u.database}
    for key, value in u.query.items():
        if key not in ("host", "port"):
            parts[key] = ",".join(value) if isinstance(value, tuple) else value
    if "host" in u.query:
        pairs = hosts(u)
        parts["host"] = ",".join(h for h, _ in pairs)
        parts["port"] = ",".join(str(p) if p else "" for _, p in pairs)
    return make_conninfo(**{k: v for k, v in parts.items() if v is not None})


def hosts(url: DatabaseURL) -> list[tuple[str, int | None]]:
    """Every (host, port) the URL names: the one of a plain URL, or each host of a multi-host one,
    written either as repeated `?host=h:p` or in libpq's own lists (`?host=a,b&port=p1,p2`)."""
    u = parse(url)
    listed = u.query.get("host")
    if listed is None:
        return [(u.host or "localhost", u.port)]
    items = [h for item in _values(listed) for h in item.split(",")]
    ports = [p for item in _values(u.query.get("port")) for p in item.split(",")]
    pairs: list[tuple[str, int | None]] = []
    for i, item in enumerate(items):
        host, sep, port = item.rpartition(":")
        if sep and port.isdigit() and not item.endswith("]"):
            pairs.append((host.strip("[]"), int(port)))
            continue
        # libpq: one port for every host, or one per host.
        given = ports[0] if len(ports) == 1 else ports[i] if i < len(ports) else ""
        pairs.append((item.strip("[]"), int(given) if given.isdigit() else u.port))
    return pairs


def _values(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A query parameter's values: SQLAlchemy gives a repeated one as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)
