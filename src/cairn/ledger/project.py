"""A model project: a folder with ``cairn-project.json`` naming its ledger database and artifact store.

By default both live in the folder (``ledger.db``, SQLite in WAL mode, and ``store/``); a team on
several machines points ``--db`` at PostgreSQL and ``--store`` at shared storage (any fsspec URL).
The ledger's ``meta`` table holds the project's identity, base model, weights fingerprint of the
base, gate policy and training method (:mod:`cairn.ledger.method`); the first release, ``base``, is
the base model itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import uuid
from pathlib import Path

import sqlalchemy as sa

from cairn import atomic
from cairn.errors import CairnError
from cairn.ledger import db
from cairn.ledger.gate import Policy
from cairn.ledger.store import ArtifactStore

PROJECT_FILE = "cairn-project.json"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Project:
    """An open project: ``engine`` (SQLAlchemy), ``store`` (artifacts) and its meta facts."""

    def __init__(self, path: Path, db_url: str, store_url: str, engine: sa.Engine, store: ArtifactStore):
        self.path, self.db_url, self.store_url, self.engine, self.store = path, db_url, store_url, engine, store
        with engine.connect() as conn:
            self.meta = {r.key: r.value for r in conn.execute(sa.select(db.meta))}

    # -- facts ----------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return self.meta["base"]

    @property
    def policy(self) -> Policy:
        return Policy(**self.meta["policy"])

    @property
    def method(self) -> dict:
        return self.meta["method"]

    # -- queries --------------------------------------------------------------------------------
    def release(self, name: str):
        with self.engine.connect() as c:
            row = c.execute(sa.select(db.releases).where(db.releases.c.name == name)).first()
        if row is None:
            raise CairnError(f"release {name!r} does not exist in project {self.path}; releases: "
                             f"{', '.join(r.name for r in self.releases()) or 'none'} (see `cairn ledger {self.path}`)")
        return row

    def release_by_id(self, rid: int):
        with self.engine.connect() as c:
            return c.execute(sa.select(db.releases).where(db.releases.c.id == rid)).one()

    def releases(self) -> list:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(db.releases).order_by(db.releases.c.id)))

    def contributions(self) -> list:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(db.contributions).order_by(db.contributions.c.id)))

    def probes(self) -> list:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(db.probes).order_by(db.probes.c.id)))

    def evaluations(self) -> list:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(db.evaluations).order_by(db.evaluations.c.id)))

    def lineage(self, release) -> list:
        """The chain of releases from the base to ``release`` (inclusive)."""
        by_id = {r.id: r for r in self.releases()}
        chain = [by_id[release.id]]
        while chain[-1].parent_id is not None:
            chain.append(by_id[chain[-1].parent_id])
        return chain[::-1]

    def contribution_exists(self, name: str) -> bool:
        with self.engine.connect() as c:
            return c.execute(sa.select(db.contributions.c.id).where(db.contributions.c.name == name)).first() is not None


def _resolve(path: Path, cfg: dict) -> tuple[str, str]:
    db_url = cfg.get("db") or f"sqlite:///{(path / 'ledger.db').resolve()}"
    store_url = cfg.get("store") or str((path / "store").resolve())
    return db_url, store_url


def open_project(path: str | Path) -> Project:
    path = Path(path)
    f = path / PROJECT_FILE
    if not f.is_file():
        raise CairnError(f"{path} is not a cairn project (no {PROJECT_FILE}); create one with "
                         f"`cairn init {path} --base MODEL`")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CairnError(f"{f} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    db_url, store_url = _resolve(path, cfg)
    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).is_file():
        # SQLite would silently create an empty file; a missing ledger is an error, not a new one
        raise CairnError(f"the ledger database {db_url.removeprefix('sqlite:///')} of project {path} is missing; "
                         "restore it from a backup")
    engine = db.make_engine(db_url)
    db.check_and_migrate(engine, db_url, create=False)
    store = ArtifactStore(store_url)
    return Project(path, db_url, store_url, engine, store)


def init_project(path: str | Path, base: str, policy: Policy, method: dict, db_url: str | None = None,
                 store_url: str | None = None) -> Project:
    """Create the project folder, database (schema at head), store and the ``base`` release."""
    from cairn.ledger.weights import fingerprint_model
    from cairn.models import load_model

    path = Path(path)
    if (path / PROJECT_FILE).exists():
        raise CairnError(f"{path} is already a cairn project; pick another folder or use it as it is")
    created = not path.exists()
    cfg = {"format": 1, "db": db_url, "store": store_url}
    db_url, store_url = _resolve(path, cfg)
    try:
        model = load_model(base)  # the base must load before anything is created
        base_sha = fingerprint_model(model)
        path.mkdir(parents=True, exist_ok=True)
        store = ArtifactStore(store_url, create=True)
        engine = db.make_engine(db_url)
        with engine.connect() as conn:
            if db.current_revision(conn) is not None:
                raise CairnError(f"ledger database {db_url!r} already holds a ledger; use a fresh database")
        db.check_and_migrate(engine, db_url, create=True)
        with engine.begin() as conn:
            facts = {"project_id": uuid.uuid4().hex, "name": path.resolve().name, "base": base,
                     "base_weights_sha256": base_sha, "policy": dataclasses.asdict(policy), "method": method,
                     "created_at": now()}
            conn.execute(sa.insert(db.meta), [{"key": k, "value": v} for k, v in facts.items()])
            conn.execute(sa.insert(db.releases).values(
                name="base", parent_id=None, kind="base", artifact_sha=None, artifact_kind=None, status="accepted",
                gate=None, settings={"model": base, "weights_sha256": base_sha}, created_at=now()))
        atomic.write_json(path / PROJECT_FILE, cfg)  # last: the folder is a project only once complete
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return Project(path, db_url, store_url, engine, store)
