"""The local cluster's roles, their passwords and the URLs that carry them.

    postgres            the bootstrap superuser: used by the stack alone (roles, database)
    runstate_owner      owns the database, its schema and tables; runs the migrations; not a
                        superuser (CREATEDB only, for the test suite's scratch databases)
    runstate_consumer   the consumer service: appends events, writes projections
    runstate_gateway    the HTTP gateway: reads
    runstate_auditor    history, replay --verify: reads
    runstate_replicator the standby's login (RUNSTATE_STACK=replicated): REPLICATION only

The privileges on the tables are the migrations' (revision 0008); the stack only creates the
login roles. Passwords are random, made once per cluster and kept in <home>/passwords.json
(mode 0600): the URLs in .runstate/env and .runstate/service.env carry them."""

from __future__ import annotations

import json
import os
import secrets
import urllib.parse
from pathlib import Path

DB_NAME = "runstate"
SUPERUSER = "postgres"
OWNER_ROLE = "runstate_owner"
CONSUMER_ROLE = "runstate_consumer"
GATEWAY_ROLE = "runstate_gateway"
AUDITOR_ROLE = "runstate_auditor"
SERVICE_ROLES = (CONSUMER_ROLE, GATEWAY_ROLE, AUDITOR_ROLE)
ALL_ROLES = (SUPERUSER, OWNER_ROLE, *SERVICE_ROLES)
# The standby's login to the primary (replicated stack only): REPLICATION, nothing else.
REPLICATION_ROLE = "runstate_replicator"

# role -> the variable of its URL in .runstate/service.env
SERVICE_URL_VARS = {
    OWNER_ROLE: "RUNSTATE_ADMIN_DATABASE_URL",
    CONSUMER_ROLE: "RUNSTATE_CONSUMER_DATABASE_URL",
    GATEWAY_ROLE: "RUNSTATE_GATEWAY_DATABASE_URL",
    AUDITOR_ROLE: "RUNSTATE_AUDITOR_DATABASE_URL",
}
# The role of DATABASE_URL in .runstate/env: what a user's shell and HTTP-side tools get.
PUBLIC_ROLE = GATEWAY_ROLE


def passwords_file(home: Path) -> Path:
    return home / "passwords.json"


def load_passwords(home: Path) -> dict[str, str] | None:
    """The cluster's passwords, or None when it has none yet (a new or pre-SCRAM cluster)."""
    try:
        data = json.loads(passwords_file(home).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if all(isinstance(data.get(r), str) and data[r] for r in ALL_ROLES) else None


def new_passwords(home: Path) -> dict[str, str]:
    """Fresh random passwords for every role, written (0600) before anything uses them."""
    passwords = {role: secrets.token_urlsafe(24) for role in ALL_ROLES}
    path = passwords_file(home)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(passwords, fh)
    tmp.replace(path)
    return passwords


def url(role: str, password: str, host: str, port: int | list[int], ca: Path | None, database: str = DB_NAME) -> str:
    """SQLAlchemy URL of `database` as `role`, over TLS verified against the local CA (`ca`;
    None: the plaintext stack, no TLS). Several ports: a multi-host URL (primary and standby,
    `?host=h:p&host=h:q&target_session_attrs=read-write`) that finds whichever is the primary."""
    query: list[tuple[str, str]] = []
    where = f"{host}:{port}"
    if isinstance(port, list):
        where = ""
        query += [("host", f"{host}:{p}") for p in port] + [("target_session_attrs", "read-write")]
    if ca:
        query += [("sslmode", "verify-full"), ("sslrootcert", str(ca))]
    text = "?" + urllib.parse.urlencode(query, safe="/:") if query else ""
    return (f"postgresql+psycopg://{urllib.parse.quote(role, safe='')}:{urllib.parse.quote(password, safe='')}"
            f"@{where}/{database}{text}")


def replication_password(home: Path) -> str:
    """The replication role's password, added to passwords.json (0600) when the file predates it:
    it is not in ALL_ROLES, so a single-node cluster's file stays valid."""
    path = passwords_file(home)
    data = json.loads(path.read_text())
    if not isinstance(data.get(REPLICATION_ROLE), str):
        data[REPLICATION_ROLE] = secrets.token_urlsafe(24)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        tmp.replace(path)
    return data[REPLICATION_ROLE]


def conninfo(role: str, host: str, port: int, ca: Path | None, database: str) -> str:
    """A libpq conninfo string for psql (the password goes in PGPASSWORD, never in argv)."""
    tls = {"sslmode": "verify-full", "sslrootcert": str(ca)} if ca else {"sslmode": "disable"}
    values = {"host": host, "port": str(port), "user": role, "dbname": database, **tls}
    return " ".join(f"{k}='{v.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"
                    for k, v in values.items())


def role_sql(role: str, password: str) -> tuple[str, str]:
    """(create, alter) statements giving `role` LOGIN with `password` and only its attributes."""
    attributes = "LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS " + (
        "CREATEDB" if role == OWNER_ROLE else "NOCREATEDB")
    quoted = "'" + password.replace("'", "''") + "'"
    return (f"CREATE ROLE {role} {attributes} PASSWORD {quoted}",
            f"ALTER ROLE {role} {attributes} PASSWORD {quoted}")
