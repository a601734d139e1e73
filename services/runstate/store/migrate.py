"""Apply the Alembic migrations as the owner role, granting the service's role
(the user named in DATABASE_URL) only what it needs."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(admin_url: str, app_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", admin_url.replace("%", "%%"))
    owner = make_url(admin_url).username
    app_role = make_url(app_url).username
    config.attributes["app_role"] = app_role if app_role and app_role != owner else None
    return config


def upgrade(admin_url: str, app_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(admin_url, app_url), revision)
