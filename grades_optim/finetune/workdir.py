"""The work folder of a fine-tuning run: crash-safe checkpoints and finished methods, for ``--resume``.

Beside the report folder ``<parent>/<name>`` (``--out``) a run keeps::

    <parent>/.<name>.work/
        config.json           the run's configuration and its hash (the folder appears with it)
        <method>/ckpt-*.pt     crash-safe checkpoints (grades_optim.checkpoint: atomic, sha256)
        <method>/result.json   a finished method's result (written to a temporary file, renamed)

The folder is removed once the report folder is in place. Rules, all decided before anything is
written (so a refusal modifies nothing):

* no work folder: start fresh (with ``--resume`` the log says there was nothing to resume);
* a work folder and ``--resume``: continue it if its configuration hash matches, otherwise refuse
  (the message names the settings that differ); ``--overwrite`` never discards it here;
* a work folder without ``--resume``: refuse, unless ``--overwrite``, which discards it.

The hash covers every setting that can change a result: everything in :class:`FinetuneConfig`
except ``out``, ``overwrite``, ``resume``, ``progress`` (``--quiet``), ``threads`` and
``checkpoint_every``, plus the grades_optim version. Model and dataset are identified by path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import tempfile
from typing import Optional

from .config import FinetuneConfig
from .errors import OutputError

__all__ = ["WorkFolder", "work_dir", "config_identity", "config_hash", "write_json_atomic"]

logger = logging.getLogger("grades_optim.finetune")

# Settings that cannot change a result: they may differ between a run and its resumption.
NOT_HASHED = ("out", "overwrite", "resume", "progress", "threads", "checkpoint_every")


def work_dir(out) -> pathlib.Path:
    out = pathlib.Path(out).absolute()
    return out.parent / f".{out.name}.work"


def config_identity(cfg: FinetuneConfig, world_size: int = 1) -> dict:
    from .. import __version__

    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HASHED}
    ident["methods"] = list(ident["methods"])
    ident["eval_at"] = list(ident.get("eval_at") or ())  # a tuple in the config, a list once read back from JSON
    ident["grades_optim_version"] = __version__
    if world_size > 1:  # torchrun: the batch split and the per-rank RNG states depend on it
        ident["world_size"] = world_size
    return ident


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: pathlib.Path, obj) -> None:
    """Write JSON to a temporary file, fsync it, rename it over ``path``: never a torn file."""
    from grades_optim.checkpoint import write_atomic

    write_atomic(path, json.dumps(obj, allow_nan=True).encode("utf-8"))


class WorkFolder:
    """The work folder of one ``--out``; :meth:`prepare` applies the rules above."""

    def __init__(self, path: pathlib.Path, identity: dict, resuming: bool):
        self.path = path
        self.identity = identity
        self.hash = config_hash(identity)
        self.resuming = resuming  # an existing folder of the same configuration is continued

    @classmethod
    def prepare(cls, out, cfg: FinetuneConfig, world_size: int = 1, writer: bool = True) -> "WorkFolder":
        """Check the rules; discards an old folder only for ``--overwrite`` without ``--resume``.

        Under torchrun every rank calls this (each reaches the same decision, so a refusal is
        raised everywhere) and only the ``writer`` (rank 0) discards or later creates anything.
        """
        path = work_dir(out)
        identity = config_identity(cfg, world_size)
        if not path.exists():
            if cfg.resume:
                logger.info("--resume: no interrupted run of --out %s (no %s); starting fresh", out, path)
            return cls(path, identity, resuming=False)
        if cfg.resume:
            saved = cls._read_config(path)
            if saved.get("hash") != config_hash(identity):
                before = saved.get("config") or {}
                diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
                raise OutputError(
                    f"--resume: the interrupted run in {path} was started with another configuration "
                    f"(differs in: {', '.join(diff) or 'its hash'}); rerun with the same options, or "
                    "drop --resume and pass --overwrite to discard it")
            done = [m for m in cfg.methods if (path / m / "result.json").is_file()]
            logger.info("--resume: continuing the interrupted run in %s (finished: %s)", path,
                        ", ".join(done) or "none")
            return cls(path, identity, resuming=True)
        if not cfg.overwrite:
            raise OutputError(f"{path} holds an interrupted run for --out {out}; pass --resume to continue "
                              "it, or --overwrite to discard it")
        if writer:
            logger.warning("--overwrite: discarding the interrupted run in %s", path)
            shutil.rmtree(path)
        return cls(path, identity, resuming=False)

    @staticmethod
    def _read_config(path: pathlib.Path) -> dict:
        try:
            saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OutputError(f"--resume: {path} is not a usable work folder ({exc}); remove it, or drop "
                              "--resume and pass --overwrite to discard it") from None
        if not isinstance(saved, dict):
            raise OutputError(f"--resume: {path}/config.json was not written by grades-optim")
        return saved

    def create(self) -> None:
        """Make the folder (config.json first, then one rename) unless it exists already."""
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.path.name}.tmp-", dir=self.path.parent))
        try:
            write_json_atomic(tmp / "config.json", {"hash": self.hash, "config": self.identity})
            tmp.rename(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def checkpoints(self, method: str) -> pathlib.Path:
        return self.path / method

    def load_result(self, method: str) -> Optional[dict]:
        """A finished method's result, or None (not finished, or unreadable: it is retrained)."""
        path = self.path / method / "result.json"
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("cannot read %s (%s); training %s again", path, exc, method)
            return None
        return result if isinstance(result, dict) else None

    def save_result(self, method: str, result: dict) -> None:
        folder = self.path / method
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "result.json", result)
        for ckpt in folder.glob("ckpt-*.pt"):  # the result supersedes them; free the disk
            ckpt.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
