"""Apply the Alembic migrations as the owner role, granting the service's role
(the user named in DATABASE_URL) only what it needs."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from runstate.database_urls import DatabaseURL, parse, reveal

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(admin_url: DatabaseURL, app_url: DatabaseURL) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", reveal(admin_url).replace("%", "%%"))
    owner = parse(admin_url).username
    app_role = parse(app_url).username
    config.attributes["app_role"] = app_role if app_role and app_role != owner else None
    return config


def upgrade(admin_url: DatabaseURL, app_url: DatabaseURL, revision: str = "head") -> None:
    command.upgrade(alembic_config(admin_url, app_url), revision)
