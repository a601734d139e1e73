"""Alembic environment: migrations run as the owner role; the service's role
(the user in DATABASE_URL) only receives the grants the migrations give it."""

from alembic import context
from sqlalchemy import create_engine

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic: sqlalchemy.url is not set")
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
