"""Database URLs. Settings carry SQLAlchemy URLs (`postgresql+psycopg://user:pass@host:port/db`),
often as a SecretStr; psycopg and libpq take a conninfo string instead. Every conversion
between the two forms is here.

Not handled yet: multi-host URLs (a primary and its standby). SQLAlchemy keeps their hosts in
the query (`?host=a:5432&host=b:5433`), libpq wants `host=a,b port=5432,5433`: that
conversion belongs in libpq_dsn."""

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
        parts[key] = ",".join(value) if isinstance(value, tuple) else value
    return make_conninfo(**{k: v for k, v in parts.items() if v is not None})
