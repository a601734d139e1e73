"""`runstate db upgrade|downgrade|current|history` on a scratch database, as --json and text."""

from __future__ import annotations

import json
import re

import pytest

from audit.support import scratch_database
from pipeline.harness import settings_env
from runstate.config import Settings
from runstate.store.migrate import MIGRATIONS

from .conftest import invoke

pytestmark = [pytest.mark.postgres]


def revisions_on_disk() -> list[str]:
    """Revision ids of the migration files, oldest first (read from the files, not Alembic)."""
    found = {}
    for path in (MIGRATIONS / "versions").glob("*.py"):
        text = path.read_text()
        revision = re.search(r'^revision = "(\w+)"', text, re.M).group(1)
        down = re.search(r'^down_revision = (None|"\w+")', text, re.M).group(1).strip('"')
        found[revision] = None if down == "None" else down
    chain, current = [], None
    while len(chain) < len(found):
        current = next(r for r, d in found.items() if d == current)
        chain.append(current)
    return chain


def test_db_history_json_lists_the_migration_files_in_order():
    done = invoke({}, "db", "history", "--json")
    assert done.exit_code == 0, done.stderr
    history = json.loads(done.stdout)
    chain = revisions_on_disk()
    assert [h["revision"] for h in history] == chain
    assert [h["down_revision"] for h in history] == [None, *chain[:-1]]
    assert all(h["description"] for h in history)
    assert len(invoke({}, "db", "history").stdout.splitlines()) == len(chain)


def test_db_downgrade_current_and_upgrade(kafka_bootstrap, database_url, admin_database_url):
    chain = revisions_on_disk()
    head, previous = chain[-1], chain[-2]
    with scratch_database(admin_database_url, database_url, "cli_db") as (app_url, admin_url):
        env = settings_env(Settings(kafka_bootstrap_servers=kafka_bootstrap, database_url=app_url,
                                    admin_database_url=admin_url))
        current = invoke(env, "db", "current", "--check", "--json")
        assert current.exit_code == 0, current.stderr
        assert json.loads(current.stdout) == {"revision": head, "head": head, "up_to_date": True}

        refused = invoke(env, "db", "downgrade", "-1")  # no terminal to confirm on
        assert refused.exit_code == 2 and "--yes" in refused.stderr

        down = invoke(env, "db", "downgrade", "-1", "--yes", "--json")
        assert down.exit_code == 0, down.stderr
        assert json.loads(down.stdout) == {"revision": previous, "head": head}

        behind = invoke(env, "db", "current", "--check", "--json")
        assert behind.exit_code == 1
        assert json.loads(behind.stdout) == {"revision": previous, "head": head, "up_to_date": False}
        assert invoke(env, "db", "current").stdout.strip() == f"database at revision {previous} (head {head})"

        up = invoke(env, "db", "upgrade", "--json")
        assert up.exit_code == 0, up.stderr
        assert json.loads(up.stdout) == {"revision": head, "head": head}
        assert invoke(env, "db", "current", "--check").exit_code == 0

        unknown = invoke(env, "db", "upgrade", "no-such-revision")
        assert unknown.exit_code == 2 and unknown.stderr.startswith("error: ")
