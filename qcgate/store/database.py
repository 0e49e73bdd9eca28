"""Engine and session factory; SQLite gets WAL and durable commits, PostgreSQL is used as is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.errors import ConfigError, QcgateError

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while the node writes; synchronous=FULL makes a commit survive power loss.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_db_engine(url: str, *, must_exist: bool = False) -> Engine:
    """Create an engine for ``url``; SQLite parent directories are created.

    With ``must_exist`` (read-only commands), a missing SQLite file is an error instead of being
    created empty.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database url {url!r} is not a valid SQLAlchemy URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            if must_exist and not Path(parsed.database).exists():
                raise QcgateError(f"no qcgate database at {parsed.database}: run `qcgate db upgrade` or `qcgate serve` first")
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is what we install
    return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _migrate(engine: Engine, step: Callable[[AlembicConfig, str], None], revision: str) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            step(config, revision)
    except OperationalError as exc:
        raise ConfigError(f"cannot reach database {engine.url.render_as_string(hide_password=True)}: {exc.orig}") from None


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision``."""
    _migrate(engine, command.upgrade, revision)


def downgrade_database(engine: Engine, revision: str) -> None:
    """Undo Alembic migrations down to ``revision`` (the migration tests check each downgrade)."""
    _migrate(engine, command.downgrade, revision)


def is_current(engine: Engine) -> bool:
    """True when the schema exists (an alembic_version row is present)."""
    return inspect(engine).has_table("alembic_version")
