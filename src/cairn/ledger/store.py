"""Content-addressed artifact store on any fsspec filesystem (a local folder by default).

Every object is stored under ``objects/<sha[:2]>/<sha256>`` and named by the SHA-256 of its bytes,
so identical artifacts are stored once and a name can never point at different content. Every read
re-hashes the bytes and refuses (:class:`CairnError`) an object whose content no longer matches its
name: a flipped byte on a shared disk or bucket is caught before a model is built from it.
A folder (an adapter, a model) is stored as its files plus a JSON manifest {relative path: sha};
the folder's hash is the manifest's hash.

Hand-written here: the addressing and verification; fsspec does the storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

from cairn.errors import CairnError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    def __init__(self, url: str, create: bool = False):
        import fsspec

        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise CairnError(f"artifact store {url!r} is not a usable fsspec URL: {exc}") from None
        self.root = self.root.rstrip("/")
        try:
            if create:
                self.fs.makedirs(f"{self.root}/objects", exist_ok=True)
            reachable = self.fs.isdir(f"{self.root}/objects")
        except Exception as exc:  # any backend's failure to connect or list
            raise CairnError(f"artifact store {url!r} is unreachable: {type(exc).__name__}: {exc}. "
                             "Check the URL, the network and your credentials") from None
        if not reachable:
            raise CairnError(f"artifact store {url!r} is unreachable or not a cairn store (no objects/ folder). "
                             "Check the path; a new project's store is created by `cairn init`")

    def _path(self, sha: str) -> str:
        return f"{self.root}/objects/{sha[:2]}/{sha}"

    def has(self, sha: str) -> bool:
        return self.fs.exists(self._path(sha))

    # -- writing -------------------------------------------------------------------------------
    def put_file(self, path: str | os.PathLike) -> str:
        sha = sha256_file(path)
        if not self.has(sha):
            final = self._path(sha)
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"  # upload aside, then rename: no half object at its name
            self.fs.put_file(str(path), tmp)
            self.fs.mv(tmp, final)
        return sha

    def put_bytes(self, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        try:
            return self.put_file(f.name)
        finally:
            os.unlink(f.name)

    def put_dir(self, folder: str | os.PathLike) -> str:
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        manifest = {"files": {p.relative_to(folder).as_posix(): self.put_file(p) for p in files}}
        return self.put_bytes(json.dumps(manifest, sort_keys=True).encode())

    # -- reading (always verified) -------------------------------------------------------------
    def _corrupt(self, sha: str, got: str) -> CairnError:
        return CairnError(f"artifact {sha[:12]} in store {self.url!r} is corrupted: its content hashes to "
                          f"{got[:12]}. Restore {self._path(sha)} from a backup or re-contribute it")

    def get_file(self, sha: str, dest: str | os.PathLike) -> Path:
        dest = Path(dest)
        if not self.has(sha):
            raise CairnError(f"artifact {sha[:12]} is missing from store {self.url!r} ({self._path(sha)})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}-{uuid.uuid4().hex}")
        h = hashlib.sha256()
        try:
            with self.fs.open(self._path(sha), "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != sha:
                raise self._corrupt(sha, h.hexdigest())
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    def get_bytes(self, sha: str) -> bytes:
        if not self.has(sha):
            raise CairnError(f"artifact {sha[:12]} is missing from store {self.url!r} ({self._path(sha)})")
        with self.fs.open(self._path(sha), "rb") as f:
            data = f.read()
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise self._corrupt(sha, got)
        return data

    def get_dir(self, sha: str, dest: str | os.PathLike) -> Path:
        """Write the folder ``sha`` to ``dest`` (which must not exist), every file verified."""
        from cairn.atomic import atomic_dir

        manifest = json.loads(self.get_bytes(sha))
        with atomic_dir(dest) as tmp:
            for rel, file_sha in manifest["files"].items():
                self.get_file(file_sha, tmp / rel)
        return Path(dest)

    def object_path(self, sha: str) -> str:
        """Where an object lives in the store (for tests and repairs)."""
        return self._path(sha)
