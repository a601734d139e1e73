from __future__ import annotations

import pytest

from runstate.config import Settings
from runstate.store.migrate import upgrade


@pytest.fixture(scope="session")
def base_settings(kafka_bootstrap: str, database_url: str, admin_database_url: str) -> Settings:
    upgrade(admin_database_url, database_url)
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        database_url=database_url,
        admin_database_url=admin_database_url,
    )
