"""The ledger database: tables, engine set-up, and schema migrations (Alembic, run in-process).

One schema serves SQLite and PostgreSQL (any SQLAlchemy URL works in principle; PostgreSQL is the
supported server). SQLite runs in WAL mode with a busy timeout and takes its write lock at the start
of every transaction (``BEGIN IMMEDIATE``), so concurrent writers on one machine queue instead of
failing half-way. The migrations live in ``cairn/ledger/migrations`` and are applied with Alembic's
Python API; a database whose revision this cairn does not know was written by a newer cairn and is
refused before anything is read or written.

Hand-written here: only the table definitions and the wiring; SQLAlchemy and Alembic do the rest.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from cairn.errors import CairnError

MIGRATIONS = Path(__file__).with_name("migrations")

metadata = sa.MetaData()

# Key/value facts about the project (its id, base model, policy, method), JSON values.
meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
)

releases = sa.Table(
    "releases", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),            # base | sequential | merge | mix | import
    sa.Column("artifact_sha", sa.String(64), nullable=True),     # adapter or model folder (manifest hash)
    sa.Column("artifact_kind", sa.String(16), nullable=True),    # adapter | model | lora-moe | None (base)
    sa.Column("status", sa.String(16), nullable=False),          # accepted | flagged | rejected
    sa.Column("gate", sa.JSON, nullable=True),                   # the gate's table and decision
    sa.Column("settings", sa.JSON, nullable=True),               # fold method and parameters
    sa.Column("created_at", sa.String(32), nullable=False),
)

contributions = sa.Table(
    "contributions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("contributor", sa.String(128), nullable=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
    sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=True),
    sa.Column("mode", sa.String(16), nullable=False),            # data | adapter | model | import
    sa.Column("method", sa.JSON, nullable=True),                 # method and its settings
    sa.Column("data_fingerprint", sa.JSON, nullable=True),       # {"sha256", "counts", "stored"?}; the rows only with keep_data
    sa.Column("artifact_sha", sa.String(64), nullable=True),
    sa.Column("artifact_kind", sa.String(16), nullable=True),
    sa.Column("wall_seconds", sa.Float, nullable=True),
    sa.Column("created_at", sa.String(32), nullable=False),
)

probes = sa.Table(
    "probes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("contribution_id", sa.Integer, sa.ForeignKey("contributions.id"), nullable=False),
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("sha", sa.String(64), nullable=False),             # the JSONL rows in the artifact store
    sa.Column("n_items", sa.Integer, nullable=False),
)

evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
    sa.Column("probe_id", sa.Integer, sa.ForeignKey("probes.id"), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("item_scores", sa.JSON, nullable=False),           # per item, for the paired bootstrap
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.UniqueConstraint("release_id", "probe_id", name="uq_evaluation"),
)


def _sqlite_setup(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        # Take the write lock up front: two writers then queue on busy_timeout instead of one failing
        # with "database is locked" when its read transaction tries to become a write transaction.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> sa.Engine:
    try:
        engine = sa.create_engine(url, future=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise CairnError(f"ledger database URL {url!r} is not usable: {exc}. Use sqlite:///PATH or "
                         "postgresql+psycopg://USER@HOST/DB (with the psycopg driver installed)") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current_revision(connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def check_and_migrate(engine: sa.Engine, url: str, create: bool) -> None:
    """Bring the schema to this cairn's head; refuse a newer or a foreign database."""
    from alembic import command
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
    except sa.exc.OperationalError as exc:
        raise CairnError(f"cannot reach the ledger database {url!r}: {str(exc.orig).strip()}. "
                         "Check the URL, that the server runs and that you may connect") from None
    if rev is None and not create:
        raise CairnError(f"{url!r} is not a cairn ledger (no schema revision); create a project with "
                         "`cairn init PROJECT --base MODEL`")
    if rev is not None:
        known = {s.revision for s in script.walk_revisions()}
        if rev not in known:
            raise CairnError(f"the ledger database {url!r} has schema revision {rev!r}, newer than this cairn knows "
                             f"(newest known: {script.get_current_head()!r}); upgrade cairn to open it")
        if rev == script.get_current_head():
            return
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "head")
