"""Artifact writing primitives: a directory appears complete or not at all."""

from __future__ import annotations

import hashlib as _hashlib
import json as _json
import os
import shutil
import time as _time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass as _dataclass
from pathlib import Path
from typing import Any as _Any
from typing import Callable as _Callable


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory; rename it to ``target`` only if the block succeeds.

    A crash leaves a ``.tmp-*`` directory that no reader treats as the artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists; refusing to overwrite it")
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- content-addressed store ---------------------------------------------------------------
MANIFEST = "manifest.json"
_CODE_VERSION: str | None = None


def code_version() -> str:
    """kd_core's version plus a hash of its source, so a code change invalidates stage caches."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import kd_core

        root = Path(kd_core.__file__).parent
        digest = _hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _CODE_VERSION = f"{kd_core.__version__}+{digest.hexdigest()[:12]}"
    return _CODE_VERSION


def _file_sha256(path: Path) -> str:
    digest = _hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and content, the manifest excluded."""
    root = Path(root)
    digest = _hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + _file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def canonical_json(value: _Any) -> str:
    return _json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


@_dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    digest: str

    def ref(self) -> dict:
        return {"stage": self.stage, "key": self.key, "digest": self.digest, "path": str(self.path)}

    @property
    def manifest(self) -> dict:
        return _json.loads((self.path / MANIFEST).read_text())


class CorruptArtifactError(RuntimeError):
    pass


class ArtifactStore:
    """``root/<stage>/<key>/`` holds one stage output and its manifest; nothing is edited in place.

    The key hashes the stage's resolved config section, the digests of its inputs and the code
    it runs. Each artifact's manifest records the digest of its files; a lookup re-hashes them,
    so a deleted or edited artifact is recomputed instead of used.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_key(self, stage: str, config: _Any, inputs: dict[str, Artifact] | None = None, code: str | None = None) -> str:
        """``code``: a hash of the source the stage runs (kd_core.fingerprint); without it, all of kd_core's."""
        payload = {
            "stage": stage,
            "config": config,
            "inputs": {name: art.digest for name, art in sorted((inputs or {}).items())},
            "code": code or code_version(),
        }
        return _hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]

    def path_for(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str):
        """An inter-process lock for computing ``stage/key``: runs sharing a store (or a shared
        filesystem with working ``flock``) compute each key once; the others wait, then find it."""
        from filelock import FileLock

        path = self.root / ".locks" / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def work_dir(self, stage: str, key: str) -> Path:
        """Scratch space that survives a killed run (checkpoints), removed once the stage lands."""
        return self.root / ".work" / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The verified artifact, or None when it is missing; a corrupted one is moved aside."""
        path = self.path_for(stage, key)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = _json.loads(manifest_path.read_text())
            expected = manifest["digest"]
        except (ValueError, KeyError):
            expected = None
        actual = tree_digest(path)
        if expected != actual:
            quarantine = self.root / ".corrupt" / f"{stage}-{key}-{int(_time.time())}"
            quarantine.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, quarantine)
            raise CorruptArtifactError(
                f"artifact {stage}/{key} failed its digest check (manifest {expected}, files {actual}); "
                f"moved to {quarantine}"
            )
        return Artifact(stage, key, path, expected)

    def lookup(self, stage: str, key: str) -> tuple[Artifact | None, str | None]:
        """(artifact, problem): problem says why a present artifact could not be used."""
        try:
            return self.get(stage, key), None
        except CorruptArtifactError as exc:
            return None, str(exc)

    def write(
        self,
        stage: str,
        key: str,
        produce: _Callable[[Path], dict | None],
        *,
        config: _Any = None,
        inputs: dict[str, Artifact] | None = None,
        extra: dict | None = None,
    ) -> Artifact:
        """Run ``produce(tmp_dir)``, then seal the directory with a manifest and rename it in place."""
        started = _time.time()
        target = self.path_for(stage, key)
        with atomic_dir(target, overwrite=True) as tmp:
            result = produce(tmp) or {}
            digest = tree_digest(tmp)
            manifest = {
                "stage": stage,
                "key": key,
                "digest": digest,
                "code_version": code_version(),
                "config": config,
                "inputs": {name: art.ref() for name, art in (inputs or {}).items()},
                "result": result,
                "started": started,
                "seconds": round(_time.time() - started, 3),
                "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
                **(extra or {}),
            }
            (tmp / MANIFEST).write_text(_json.dumps(manifest, indent=2, default=str))
        shutil.rmtree(self.work_dir(stage, key), ignore_errors=True)
        return Artifact(stage, key, target, digest)


@contextmanager
def atomic_file(target: str | Path):
    """Yield a temporary sibling path; ``os.replace`` it onto ``target`` only if the block succeeds.

    Readers see either the old file or the complete new one, never a half-written file. A crash
    leaves a ``.tmp-*`` file next to the target that no reader opens.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the block wrote nothing to {tmp} for {target}")
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
