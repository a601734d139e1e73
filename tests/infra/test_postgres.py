"""SQLAlchemy 2 + psycopg 3 against the real PostgreSQL, as the owner and as the consumer's role."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def owner_engine(admin_database_url: str):
    engine = sa.create_engine(admin_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def app_engine(database_url: str):
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


def test_owner_writes_and_reads_a_temp_table(owner_engine: sa.Engine) -> None:
    assert owner_engine.dialect.driver == "psycopg"
    with owner_engine.begin() as conn:
        assert conn.scalar(sa.text("SELECT current_user")) == "runstate_owner"
        assert conn.scalar(sa.text("SHOW server_version_num")) >= "150000"
        conn.execute(sa.text("CREATE TEMP TABLE infra_probe (id int PRIMARY KEY, note text NOT NULL) ON COMMIT DROP"))
        conn.execute(sa.text("INSERT INTO infra_probe (id, note) VALUES (:id, :note)"),
                     [{"id": i, "note": f"note {i}"} for i in range(10)])
        rows = conn.execute(sa.text("SELECT id, note FROM infra_probe ORDER BY id")).all()
    assert [(r.id, r.note) for r in rows] == [(i, f"note {i}") for i in range(10)]


def test_committed_rows_are_visible_to_another_connection(owner_engine: sa.Engine) -> None:
    table = f"infra_probe_{uuid.uuid4().hex[:10]}"
    meta = sa.MetaData()
    probe = sa.Table(table, meta, sa.Column("id", sa.Uuid, primary_key=True), sa.Column("payload", sa.JSON))
    meta.create_all(owner_engine)
    try:
        rid = uuid.uuid4()
        with owner_engine.begin() as conn:
            conn.execute(probe.insert().values(id=rid, payload={"state": "RUNNING", "n": 1}))
        owner_engine.dispose()  # a brand-new connection reads it back
        with owner_engine.connect() as conn:
            row = conn.execute(sa.select(probe).where(probe.c.id == rid)).one()
        assert row.payload == {"state": "RUNNING", "n": 1}
    finally:
        meta.drop_all(owner_engine)


def test_app_role_logs_in_without_special_privileges(app_engine: sa.Engine) -> None:
    with app_engine.begin() as conn:
        assert conn.scalar(sa.text("SELECT current_user")) == "runstate_consumer"
        assert conn.scalar(sa.text("SELECT current_database()")) == "runstate"
        flags = conn.execute(sa.text(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )).one()
        assert tuple(flags) == (False, False, False, False)
        # the app role can still use a session-private table
        conn.execute(sa.text("CREATE TEMP TABLE app_probe (v text) ON COMMIT DROP"))
        conn.execute(sa.text("INSERT INTO app_probe VALUES ('written by runstate_consumer')"))
        assert conn.scalar(sa.text("SELECT v FROM app_probe")) == "written by runstate_consumer"


async def test_async_psycopg_engine_reads(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT 41 + 1")) == 42
    finally:
        await engine.dispose()


def test_a_password_with_spaces_and_quotes_reaches_libpq(database_url: str) -> None:
    """libpq_dsn quotes what a URL-shaped conninfo could not carry: the server is asked for the
    password exactly as written (so it refuses it), where a badly quoted one does not even parse."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from runstate.database_urls import libpq_dsn, parse

    password = "p@ss w:rd/%+'\""
    url = parse(database_url).set(password=password)
    assert conninfo_to_dict(libpq_dsn(url))["password"] == password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed for user"):
        psycopg.connect(libpq_dsn(url), connect_timeout=10).close()
