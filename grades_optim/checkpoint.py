"""Crash-safe training checkpoints for plain loops (and the finetune command).

A checkpoint is one file ``ckpt-<step>.pt`` holding a header line ``GRADESCKPT1 <sha256>`` and a
``torch.save`` payload (model, optimizer — GradES state included —, scheduler, RNG states, the
GradES history and user extras). It is written to a temporary file, fsynced, then renamed over
the final name, so a kill at any moment leaves either the previous set of checkpoints or the new
one, never a half-written file under a final name. On load, the newest file whose digest matches
is used; a torn or corrupted one (disk trouble, a copy cut short) is skipped with a warning and
the previous one is used. The payload loads with ``weights_only=True``.

Loading validates everything first (the model's parameter names and shapes, the optimizer's and
the scheduler's class and layout), then modifies: a checkpoint of another model or optimizer
leaves model, optimizer, scheduler and RNG untouched. Saving refuses a folder that already holds
an intact checkpoint of a later step (another run's: it would win on load and rotation would
delete the new run's files), and ``extra=`` values that ``weights_only`` loading would refuse.

Pattern::

    state = load_checkpoint(ckpt_dir, model=model, optimizer=opt, scheduler=sched)
    start = 0 if state is None else state["step"]
    for step in range(start, total_steps):
        ...train one step...
        if (step + 1) % every == 0:
            save_checkpoint(ckpt_dir, step + 1, model=model, optimizer=opt, scheduler=sched)
"""
from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import random
import re
import secrets
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "write_atomic"]

logger = logging.getLogger("grades_optim")
_MAGIC = b"GRADESCKPT1"
_NAME = re.compile(r"^ckpt-(\d{9,})\.pt$")  # 9 digits, more past step 999,999,999
_TEMP = re.compile(r"^\.ckpt-\d+\.pt\.tmp-(\d+)-[0-9a-f]+$")


def _folder(directory) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"Invalid directory: {str(directory)!r} is a file, not a checkpoint folder "
                         "(checkpoints are ckpt-<step>.pt files inside a folder); pass the folder")
    return directory


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in ``directory``, newest first (temporary files are ignored)."""
    directory = _folder(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory)
             if (m := _NAME.match(name))]
    return [path for _, path in sorted(found, reverse=True)]


def temp_name(path: Path, pid: Optional[int] = None) -> Path:
    """The temporary file a write of ``path`` goes through: unique per writer and per write."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync, rename over ``path``, fsync the folder. On any
    failure (disk full, an interrupt) the temporary file is removed and ``path`` is untouched."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Temporary files of writers that died mid-write; a live writer's are left alone."""
    for name in os.listdir(directory):
        m = _TEMP.match(name)
        if m and not _pid_alive(int(m.group(1))):
            (directory / name).unlink(missing_ok=True)


_PLAIN = (int, float, bool, str, bytes, type(None), torch.Tensor)


def _unloadable(value):
    """A part of ``value`` that ``torch.load(weights_only=True)`` would refuse, or None. Containers
    are walked and tensors and plain values pass without serialising (best weights are large)."""
    if isinstance(value, _PLAIN):
        return None
    if type(value) in (list, tuple, set):
        return next((bad for v in value if (bad := _unloadable(v)) is not None), None)
    if type(value) in (dict, collections.OrderedDict):
        return next((bad for kv in value.items() for v in kv if (bad := _unloadable(v)) is not None), None)
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception:  # what weights_only refuses varies by type and torch version: report any failure
        return value
    return None


def _check_extra(extra) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"Invalid extra: expected a dict, got {type(extra).__name__}")
    for key, value in extra.items():
        bad = _unloadable(value)
        if bad is not None:
            raise ValueError(f"Invalid extra[{key!r}]: it holds a {type(bad).__name__}, which "
                             "torch.load(weights_only=True) refuses, so the checkpoint could not be loaded "
                             "back; store plain numbers, strings, lists, dicts or tensors")
    return dict(extra)


def _class_name(obj) -> Optional[str]:
    if obj is None:
        return None
    inner = getattr(obj, "optimizer", None) if getattr(obj, "_is_grades_wrapper", False) else None
    return f"{type(obj).__name__}({type(inner).__name__})" if inner is not None else type(obj).__name__


def save_checkpoint(directory, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Atomically write ``ckpt-<step>.pt`` and keep the newest ``keep`` checkpoints."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"Invalid step: {step!r}; expected an int >= 0")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"Invalid keep: {keep!r}; expected an int >= 1 (keep 2 to survive a torn file)")
    directory = _folder(directory)
    extra = _check_extra(extra)
    later = [p for p in list_checkpoints(directory) if _step_of(p) > step]
    if later:
        intact = [p for p in later if _digest_ok(p.read_bytes()) is not None]
        if intact:
            raise ValueError(
                f"Invalid step: {step} is older than {intact[-1].name} already in {str(directory)!r}: that is "
                "another run's checkpoint (it would be loaded instead of this run's, and rotation would "
                "delete this run's files). Resume from it with load_checkpoint, or use another folder")
        for p in later:  # torn ones are never loaded: the newer step being written replaces them
            p.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "classes": {"model": _class_name(model), "optimizer": _class_name(optimizer),
                    "scheduler": _class_name(scheduler)},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},  # tuples of ints
        "history": [tuple(r) for r in getattr(optimizer, "history", [])],
        # each component's latest reading: the timeline stays complete when history is bounded
        "last": [None if t["last"] is None else tuple(t["last"]) for t in optimizer.timeline()]
        if hasattr(optimizer, "timeline") else [],
        "extra": extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = _MAGIC + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    path = directory / f"ckpt-{step:09d}.pt"
    _remove_stale_temps(directory)
    write_atomic(path, header + body)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)  # another writer may have rotated it already
    return path


def _digest_ok(data: bytes) -> Optional[bytes]:
    """The payload bytes if the header's digest matches them, else None."""
    head, sep, body = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2 or parts[0] != _MAGIC or hashlib.sha256(body).hexdigest().encode() != parts[1]:
        return None
    return body


def _read(path: Path) -> Optional[dict]:
    body = _digest_ok(path.read_bytes())
    return None if body is None else torch.load(io.BytesIO(body), weights_only=True)


def _model_error(saved: dict, model: torch.nn.Module) -> Optional[str]:
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    if missing or unexpected:
        return (f"its model has other parameters: {len(missing)} of this model's entries missing "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, v in mine.items():
        s = saved[k]
        if isinstance(v, torch.Tensor) and (not isinstance(s, torch.Tensor) or s.shape != v.shape):
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            return f"its model has other parameters: {k} is {shape} there, {tuple(v.shape)} here"
    return None


def _validate(path: Path, payload: dict, model, optimizer, scheduler) -> None:
    """Everything load_checkpoint will load, checked before any of it is: raises ValueError."""
    from .optimizer import check_optimizer_state_dict

    classes = payload.get("classes") or {}  # absent from checkpoints written before they were kept
    problems = []
    for role, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        saved = classes.get(role)
        if saved is not None and obj is not None and saved != _class_name(obj):
            problems.append(f"its {role} is a {saved}, this one a {_class_name(obj)}")
    if scheduler is not None and payload["scheduler"] is None:
        problems.append("it holds no scheduler state, yet scheduler= was given (its schedule would restart)")
    if not problems:
        error = _model_error(payload["model"], model)
        if error is None:
            try:
                check_optimizer_state_dict(optimizer, payload["optimizer"])
            except ValueError as exc:
                error = f"its optimizer state does not fit: {exc}"
        problems += [error] if error else []
    if problems:
        raise ValueError(f"Checkpoint {path} does not fit: {'; '.join(problems)}. Nothing was loaded; build "
                         "the model, optimizer and scheduler as for the saved run, or use another folder")


def load_checkpoint(directory, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, restore_rng: bool = True) -> Optional[dict]:
    """Restore the newest intact checkpoint; returns its payload (``step``, ``extra``...) or None.

    Raises ``ValueError`` (having loaded nothing) if ``directory`` is a file or the checkpoint does
    not fit the model, optimizer or scheduler given."""
    for path in list_checkpoints(directory):
        payload = _read(path)
        if payload is None:
            logger.warning("checkpoint %s is torn or corrupted (digest mismatch); trying the previous one", path)
            continue
        _validate(path, payload, model, optimizer, scheduler)
        if scheduler is None and payload["scheduler"] is not None:
            logger.warning("checkpoint %s holds a scheduler state; no scheduler= was given, so it is not "
                           "restored", path)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if restore_rng:
            torch.set_rng_state(payload["rng"]["torch"])
            version, internal, gauss = payload["rng"]["python"]
            random.setstate((version, tuple(internal), gauss))
        if hasattr(optimizer, "restore_records"):
            optimizer.restore_records(payload["history"], payload.get("last"))
        return payload
    return None
