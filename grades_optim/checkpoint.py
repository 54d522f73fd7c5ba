"""Crash-safe training checkpoints for plain loops (and the finetune command).

A checkpoint is one file ``ckpt-<step>.pt`` holding a header line ``GRADESCKPT1 <sha256>`` and a
``torch.save`` payload (model, optimizer — GradES state included —, scheduler, RNG states, the
GradES history and user extras). It is written to a temporary file, fsynced, then renamed over
the final name, so a kill at any moment leaves either the previous set of checkpoints or the new
one, never a half-written file under a final name. On load, the newest file whose digest matches
is used; a torn or corrupted one (disk trouble, a copy cut short) is skipped with a warning and
the previous one is used. The payload loads with ``weights_only=True``.

Pattern::

    state = load_checkpoint(ckpt_dir, model=model, optimizer=opt, scheduler=sched)
    start = 0 if state is None else state["step"]
    for step in range(start, total_steps):
        ...train one step...
        if (step + 1) % every == 0:
            save_checkpoint(ckpt_dir, step + 1, model=model, optimizer=opt, scheduler=sched)
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints"]

logger = logging.getLogger("grades_optim")
_MAGIC = b"GRADESCKPT1"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in ``directory``, newest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory)
             if (m := _NAME.match(name))]
    return [path for _, path in sorted(found, reverse=True)]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(directory, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Atomically write ``ckpt-<step>.pt`` and keep the newest ``keep`` checkpoints."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid step: {step!r}; expected an int >= 0")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"Invalid keep: {keep!r}; expected an int >= 1 (keep 2 to survive a torn file)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},  # tuples of ints
        "history": [tuple(r) for r in getattr(optimizer, "history", [])],
        # each component's latest reading: the timeline stays complete when history is bounded
        "last": [None if t["last"] is None else tuple(t["last"]) for t in optimizer.timeline()]
        if hasattr(optimizer, "timeline") else [],
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = _MAGIC + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    path = directory / f"ckpt-{step:09d}.pt"
    for stale in directory.glob(".ckpt-*.pt.tmp-*"):  # left by a writer killed mid-write
        stale.unlink()
    _write_atomic(path, header + body)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink()
    return path


def _read(path: Path) -> Optional[dict]:
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2 or parts[0] != _MAGIC or hashlib.sha256(body).hexdigest().encode() != parts[1]:
        return None
    return torch.load(io.BytesIO(body), weights_only=True)


def load_checkpoint(directory, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, restore_rng: bool = True) -> Optional[dict]:
    """Restore the newest intact checkpoint; returns its payload (``step``, ``extra``...) or None."""
    for path in list_checkpoints(directory):
        payload = _read(path)
        if payload is None:
            logger.warning("checkpoint %s is torn or corrupted (digest mismatch); trying the previous one", path)
            continue
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload["scheduler"] is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if restore_rng:
            torch.set_rng_state(payload["rng"]["torch"])
            version, internal, gauss = payload["rng"]["python"]
            random.setstate((version, tuple(internal), gauss))
        if hasattr(optimizer, "history"):
            from .optimizer import CheckRecord

            optimizer.history[:] = [CheckRecord(*r) for r in payload["history"]]
            last = payload.get("last") or []  # absent from checkpoints written before it was kept
            if len(last) == len(optimizer.components):
                optimizer._last = [None if r is None else CheckRecord(*r) for r in last]
        return payload
    return None
