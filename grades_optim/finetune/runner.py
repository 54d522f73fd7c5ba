"""The fine-tuning job end to end: inputs -> three methods -> a report folder, written atomically.

The output folder (and the work folder of an interrupted run, see :mod:`.workdir`) is checked
before any training, so a refusal costs nothing and modifies nothing. Checkpoints and finished
methods go to the work folder as training proceeds; the report is built in a hidden temporary
folder beside ``--out`` and renamed into place only when complete, then the work folder is
removed. On a failure the temporary folder is removed, an existing report is left untouched and
the work folder stays for ``--resume``. Under torchrun see :mod:`.parallel`.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import platform
import shutil
import tempfile
import time
from typing import Optional

import torch

from .. import report
from .config import FinetuneConfig
from .data import load_rotten_tomatoes, load_table, split_dataset
from .errors import OutputError
from .model import apply_lora, fresh_copy, load_model, trainable_summary
from .parallel import launched
from .train import Batches, Checkpoints, MethodResult, train_method
from .workdir import WorkFolder

__all__ = ["run_finetune", "check_output_dir", "context_line"]

logger = logging.getLogger("grades_optim.finetune")


def check_output_dir(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse a folder holding another run (unless ``overwrite``) or holding anything else."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "results.json").is_file():
        raise OutputError(f"--out {out} is not empty and is not a grades-optim report folder; "
                          "choose another --out (it is never overwritten)")
    if not overwrite:
        raise OutputError(f"--out {out} already holds a run (results.json); pass --overwrite to "
                          "replace it or choose another --out")


def _threads(cfg: FinetuneConfig, parallel=None) -> int:
    """``--threads`` or the CPUs not already busy: on a shared 2-core machine with the other core
    taken, 2 intra-op threads ran a MiniLM step 2.5x slower than 1 (5.6 s vs 2.2 s, measured).
    Under torchrun each rank takes an equal share of the cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cfg.threads:
        n = cfg.threads
    elif parallel is not None:
        n = max(1, len(cores) // parallel.local_world)
    elif len(cores) == 1:
        n = 1  # nothing to choose: no need to sample the load
    else:
        busy, how = _busy_cores(cores)
        n = max(1, min(len(cores), len(cores) - int(busy + 0.5)))
        if n < len(cores):
            logger.info("using %d of %d CPU threads: %s says %.1f cores are busy (override with --threads)",
                        n, len(cores), how, busy)
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _busy_cores(cores: list, interval: float = 0.3) -> tuple[float, str]:
    """How many of ``cores`` other processes keep busy now, and how that was measured.

    Sampled from ``/proc/stat`` over ``interval`` seconds: the 1-minute load average also counts a
    run that just ended (right after ``--quick`` it reads ~1.7 on an idle 2-core machine).
    """
    before = _cpu_times()
    if before is not None:
        time.sleep(interval)
        after = _cpu_times()
        if after is not None:
            return busy_between(before, after, cores), "/proc/stat"
    if hasattr(os, "getloadavg"):
        return max(0.0, os.getloadavg()[0] - 1.0), "the load average"  # minus this process
    return 0.0, "nothing"


def _cpu_times() -> Optional[dict]:
    """``{cpu index: (busy jiffies, total jiffies)}`` from ``/proc/stat``, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    times = {}
    for fields in lines:
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        times[int(fields[0][3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_between(before: dict, after: dict, cores: list) -> float:
    """Busy cores among ``cores`` between two :func:`_cpu_times` samples (0 where a core is missing)."""
    busy = 0.0
    for c in cores:
        if c in before and c in after:
            total = after[c][1] - before[c][1]
            busy += (after[c][0] - before[c][0]) / total if total > 0 else 0.0
    return busy


def context_line(threads: int, seed: int) -> str:
    import transformers

    from .. import __version__

    cpu = _cpu_name()
    return (f"CPU {cpu}, {os.cpu_count()} cores visible, torch threads {threads}; "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, grades_optim {__version__}; seed {seed}; "
            f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_data(cfg: FinetuneConfig):
    if cfg.dataset is None:
        rows, source = load_rotten_tomatoes()
    else:
        rows, source = load_table(cfg.dataset, cfg.text_column, cfg.label_column), str(cfg.dataset)
    return split_dataset(rows, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                         train_size=cfg.train_size, val_size=cfg.val_size, test_size=cfg.test_size,
                         source=source)


def run_finetune(cfg: FinetuneConfig) -> tuple[dict, Optional[pathlib.Path]]:
    """Run every method of ``cfg`` and write the report folder; returns ``(payload, folder)``.

    Under torchrun every rank returns the payload and only rank 0 writes (its folder is returned,
    the other ranks get None).
    """
    cfg.validate()
    with launched() as parallel:
        return _run(cfg, parallel)


def _run(cfg: FinetuneConfig, parallel) -> tuple[dict, Optional[pathlib.Path]]:
    out = pathlib.Path(cfg.resolved_out())
    check_output_dir(out, cfg.overwrite)
    if parallel is not None:
        parallel.check_batch(cfg.batch_size)
    # Under torchrun every rank applies the rules (the same refusal everywhere); rank 0 writes.
    work = WorkFolder.prepare(out, cfg, world_size=parallel.world if parallel else 1,
                              writer=parallel is None or parallel.is_main)
    if parallel is not None:
        parallel.barrier()  # every rank has decided before rank 0 creates the folder a late rank would see
    threads = _threads(cfg, parallel)
    splits = _load_data(cfg)
    logger.info("data: %s (%d duplicates dropped)", splits.describe(), splits.duplicates_dropped)
    tokenizer, base, model_dir = load_model(cfg.model, len(splits.label_names), seed=cfg.seed)
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        base = apply_lora(base, r=cfg.lora_r, alpha=2 * cfg.lora_r)
    trainable, total = trainable_summary(base)
    logger.info("model: %s (%s), %d/%d parameters trainable", model_dir, type(base).__name__, trainable, total)
    train, val, test = (Batches(tokenizer, s, cfg.max_length) for s in (splits.train, splits.val, splits.test))

    if parallel is None or parallel.is_main:
        work.create()
    if parallel is not None:
        parallel.barrier()  # the folder exists (or was discarded) before any rank looks into it
    results, agree = [], {}
    for method in cfg.methods:
        saved = work.load_result(method)
        if saved is not None:
            logger.info("method %s: finished before the interruption; result taken from %s", method, work.path)
            results.append(MethodResult(**saved))
            continue
        logger.info("method %s: training", method)
        ckpt = Checkpoints(work.checkpoints(method), cfg.checkpoint_every)
        model = fresh_copy(base)
        result = train_method(method, model, train, val, test, cfg, checkpoints=ckpt, parallel=parallel)
        if parallel is None or parallel.is_main:
            work.save_result(method, dataclasses.asdict(result))
        if parallel is not None:
            agree[method] = _check_agreement(parallel, method, model, result)
        results.append(result)
    context = context_line(threads, cfg.seed)
    methods = [{k: v for k, v in dataclasses.asdict(r).items() if k != "history"} for r in results]
    payload = {
        "context": {"line": context, "model_dir": str(model_dir), "dataset": splits.source,
                    "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                    "labels": [str(n) for n in splits.label_names], "trainable_params": trainable,
                    "total_params": total, "threads": threads},
        "config": dataclasses.asdict(cfg),
        "methods": methods,
    }
    if parallel is not None:
        payload["context"]["distributed"] = {"world_size": parallel.world, "backend": "gloo",
                                             "strategy": "DDP", "ranks_agree": agree}
        if not parallel.is_main:
            return payload, None
    history = [dict(h, method=r.method) for r in results for h in r.history]
    _write_atomically(out, payload, history, cfg.overwrite)
    work.remove()  # the report is in place: nothing left to resume
    return payload, out


def _check_agreement(parallel, method: str, model, result: MethodResult) -> bool:
    """Every rank must end a method with the same parameters, freeze steps and scores."""
    summary = repr((result.steps, result.stop_reason, result.test_accuracy, result.test_loss,
                    [c["frozen_at_step"] for c in result.components]))
    same = parallel.agree(model, summary)
    if same:
        logger.info("%s: all %d ranks hold identical parameters, freeze steps and scores", method, parallel.world)
    else:
        logger.warning("%s: the %d ranks disagree on parameters, freeze steps or scores", method, parallel.world)
    return same


def _write_atomically(out: pathlib.Path, payload: dict, history: list, overwrite: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        report.write_results(tmp / "results.json", payload)
        report.write_history(tmp / "history.csv", history)
        report.plot_accuracy(payload["methods"], tmp / "accuracy.png")
        report.plot_components(history, tmp / "components.png", grace_steps=report.grace_steps(payload))
        check_output_dir(out, overwrite)  # re-check: another process may have written meanwhile
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
