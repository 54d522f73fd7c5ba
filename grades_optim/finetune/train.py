"""Training loop of the fine-tuning job: one function per stopping rule over a shared loop.

* ``full``: the whole schedule.
* ``classic-es``: validation loss every ``es_every`` steps; stop after ``es_patience`` checks without
  improvement and restore the best weights (the paper's "+ES"). Validation time is counted.
* ``grades``: :class:`grades_optim.GradESOptimizer` around the same AdamW; stops when every
  projection matrix is frozen. No validation.

``wall_seconds`` is the training time of the method: batches, forward/backward, optimizer and
scheduler steps, and for classic-es its validation passes and best-weight copies. Accuracy probes
(``probe_every``, for the accuracy-vs-time plot) and the final test pass run with the clock paused.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Optional

import torch

from .config import SCHEDULES, FinetuneConfig

__all__ = ["MethodResult", "Batches", "Checkpoints", "train_method", "evaluate"]

logger = logging.getLogger("grades_optim.finetune")


@dataclasses.dataclass
class MethodResult:
    method: str
    test_accuracy: float
    test_loss: float
    wall_seconds: float
    steps: int
    planned_steps: int
    stop_reason: str
    frozen_ratio: float = 0.0
    val_seconds: float = 0.0
    curve: list = dataclasses.field(default_factory=list)  # [wall_s, step, val_accuracy, val_loss]
    train_loss: list = dataclasses.field(default_factory=list)  # one per step
    components: list = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    test_at: list = dataclasses.field(default_factory=list)  # [step, test_accuracy, test_loss] (--eval-at)


class Batches:
    """Pre-tokenised examples with dynamic padding; the batch order depends only on the seed."""

    def __init__(self, tokenizer, examples, max_length: int):
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
        self.ids = enc["input_ids"]
        self.type_ids = enc.get("token_type_ids")
        self.labels = torch.tensor([ex.label for ex in examples])
        self.pad = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index) -> dict:
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r)
            mask[k, :len(r)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels[list(index)]}
        if self.type_ids is not None:
            out["token_type_ids"] = torch.zeros_like(ids)
        return out

    def order(self, steps: int, batch_size: int, seed: int) -> list:
        """Indices of each training batch: seeded reshuffles every epoch, partial batches dropped."""
        gen = torch.Generator().manual_seed(seed)
        out, per_epoch = [], len(self) // batch_size
        while len(out) < steps:
            perm = torch.randperm(len(self), generator=gen).tolist()
            out += [perm[b * batch_size:(b + 1) * batch_size] for b in range(per_epoch)]
        return out[:steps]


@torch.no_grad()
def evaluate(model, data: Batches, batch_size: int, parallel=None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``data``; under torchrun each rank takes a share and the
    sums are all-reduced, so every rank returns the same numbers."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    rows = range(len(data)) if parallel is None else parallel.span(len(data))
    for start in range(rows.start, rows.stop, batch_size):
        b = data.batch(range(start, min(start + batch_size, rows.stop)))
        out = model(**b)
        loss_sum += float(out.loss) * len(b["labels"])
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    model.train(was_training)
    if parallel is not None:
        correct, loss_sum = parallel.all_sum([correct, loss_sum])
    return correct / len(data), loss_sum / len(data)


def planned_steps(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = n_train // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"{n_train} training examples are fewer than one batch of {cfg.batch_size}")
    return max(1, math.ceil(per_epoch * cfg.epochs))


def _grades_optimizer(inner, model, cfg: FinetuneConfig, total: int):
    from grades_optim import GradESOptimizer

    return GradESOptimizer(inner, model=model, tau=cfg.tau, tau_mode=cfg.tau_mode, alpha=cfg.alpha,
                           total_steps=total, patience=cfg.grades_patience, metric=cfg.metric,
                           ema=cfg.ema, peak_gate=cfg.peak_gate, check_interval=cfg.check_interval)


@dataclasses.dataclass
class Checkpoints:
    """Where ``train_method`` keeps crash-safe checkpoints, and every how many steps (0: never)."""
    directory: pathlib.Path
    every: int


@dataclasses.dataclass
class _Loop:
    """Everything the loop carries besides model, optimizer, scheduler and RNG: checkpointed."""
    wall: float = 0.0
    val_wall: float = 0.0
    curve: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    best_loss: float = math.inf  # classic-es: best validation loss, its step and its weights
    best_step: Optional[int] = None
    best_weights: Optional[dict] = None
    since_best: int = 0
    test_at: list = dataclasses.field(default_factory=list)

    def to_extra(self, opt) -> dict:
        extra = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no deep copies
        extra["best_weights"] = self.best_weights or {}  # a dict of tensors: loads with weights_only
        return extra

    @classmethod
    def from_extra(cls, extra: dict, opt) -> "_Loop":
        fields = {f.name for f in dataclasses.fields(cls)}
        loop = cls(**{k: v for k, v in extra.items() if k in fields})
        loop.best_weights = loop.best_weights or None
        return loop


def _resume(ckpt: Checkpoints, method: str, model, opt, sched, parallel=None) -> tuple[int, _Loop]:
    from grades_optim.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt.directory, model=model, optimizer=opt, scheduler=sched)
    if state is None:
        return 0, _Loop()
    if parallel is not None:  # the file holds rank 0's RNG; each rank continues its own stream
        torch.set_rng_state(state["extra"][_RANK_RNG][parallel.rank])
    logger.info("%s: resumed from the checkpoint of step %d", method, state["step"])
    return state["step"], _Loop.from_extra(state["extra"], opt)


def train_method(method: str, model, train: Batches, val: Batches, test: Batches,
                 cfg: FinetuneConfig, *, checkpoints: Optional[Checkpoints] = None,
                 parallel=None) -> MethodResult:
    """Fine-tune ``model`` in place with one stopping rule and score it on ``test``.

    ``checkpoints``: resume from the newest intact checkpoint there and save one every
    ``checkpoints.every`` steps. Resuming is bit-identical on CPU (same threads): the model, AdamW
    and GradES state, scheduler, RNG, clocks, losses, accuracy curve and classic-es state are
    restored, and the batch order is a function of the seed and the step. The wall clock resumes at
    its saved value: the work lost to a crash and the checkpoint writes are not counted.
    ``parallel``: a :class:`~grades_optim.finetune.parallel.Parallel` under torchrun (DDP).
    """
    from transformers import get_scheduler
    from tqdm.auto import tqdm

    total = planned_steps(cfg, len(train))
    torch.manual_seed(cfg.seed)  # identical dropout masks across methods
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    net = model if parallel is None else parallel.wrap(model)
    if method == "grades":
        opt = _grades_optimizer(opt, net, cfg, total)  # given the DDP wrapper: it picks the freeze mode
    sched = get_scheduler(SCHEDULES[cfg.schedule], opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                          num_training_steps=total)
    eval_at = set(cfg.eval_at)
    order = train.order(total, cfg.batch_size, cfg.seed)
    start, loop = _resume(checkpoints, method, model, opt, sched, parallel) if checkpoints else (0, _Loop())
    main_rank = parallel is None or parallel.is_main

    stop_reason, step = "schedule finished", start
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"{method:>10}", disable=not (cfg.progress and main_rank),
               leave=False, unit="step")
    for step, index in enumerate(order[start:], start + 1):
        t0 = time.perf_counter()
        out = net(**train.batch(index if parallel is None else parallel.shard(index)))
        out.loss.backward()
        loss = out.loss.item()
        if parallel is not None:  # the global batch's mean loss, as in a single process
            loss = parallel.all_sum([loss])[0] / parallel.world
        loop.losses.append(round(loss, 5))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loop.wall += time.perf_counter() - t0
        bar.update(1)
        if method == "classic-es" and (step % cfg.es_every == 0 or step == total):
            t0 = time.perf_counter()
            acc, vloss = evaluate(model, val, cfg.eval_batch_size, parallel)
            if vloss < loop.best_loss:
                loop.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                loop.best_loss, loop.best_step, loop.since_best = vloss, step, 0
            else:
                loop.since_best += 1
            dt = time.perf_counter() - t0
            loop.wall, loop.val_wall = loop.wall + dt, loop.val_wall + dt
            loop.curve.append([loop.wall, step, acc, vloss])
            bar.set_postfix(val_loss=f"{vloss:.4f}", best=loop.best_step)
            if loop.since_best >= cfg.es_patience and step < total:
                stop_reason = f"validation loss did not improve for {cfg.es_patience} checks"
                break
        elif method != "classic-es" and cfg.probe_every and step % cfg.probe_every == 0:
            acc, vloss = evaluate(model, val, cfg.eval_batch_size, parallel)  # clock paused: monitoring only
            loop.curve.append([loop.wall, step, acc, vloss])
        if step in eval_at:  # clock paused: monitoring only
            loop.test_at.append([step, *evaluate(model, test, cfg.eval_batch_size, parallel)])
        if method == "grades":
            s = opt.summary()
            bar.set_postfix(frozen=f"{s['frozen']}/{s['tracked']}")
            if opt.should_stop:
                stop_reason = f"GradES: all {s['tracked']} projection matrices frozen"
                break
        if not math.isfinite(loss):
            stop_reason = "loss is not finite"
            logger.warning("%s: loss became %s at step %d; stopping", method, loss, step)
            break
        if checkpoints and checkpoints.every and step % checkpoints.every == 0 and step < total:
            _save(checkpoints, step, model, opt, sched, loop, parallel)  # clock paused: not training time
    bar.close()
    if method == "classic-es" and loop.best_weights is not None:
        t0 = time.perf_counter()
        model.load_state_dict(loop.best_weights)
        loop.wall += time.perf_counter() - t0
        stop_reason += f"; restored the best weights (step {loop.best_step})"
    elif method != "classic-es" and cfg.probe_every and (not loop.curve or loop.curve[-1][1] != step):
        acc, vloss = evaluate(model, val, cfg.eval_batch_size, parallel)
        loop.curve.append([loop.wall, step, acc, vloss])
    test_acc, test_loss = evaluate(model, test, cfg.eval_batch_size, parallel)
    result = MethodResult(method, test_acc, test_loss, loop.wall, step, total, stop_reason,
                          val_seconds=loop.val_wall, curve=loop.curve, train_loss=loop.losses,
                          test_at=loop.test_at)
    if method == "grades":
        _add_grades_details(result, opt)
    logger.info("%s: test accuracy %.4f after %d/%d steps in %.1f s (%s)", method, test_acc, step,
                total, loop.wall, stop_reason)
    return result


_RANK_RNG = "rank_rng_states"


def _save(ckpt: Checkpoints, step: int, model, opt, sched, loop: _Loop, parallel=None) -> None:
    """Rank 0 writes (the ranks hold identical model, optimizer and loop state under DDP)."""
    from grades_optim.checkpoint import save_checkpoint

    extra = loop.to_extra(opt)
    if parallel is not None:
        extra[_RANK_RNG] = parallel.gather(torch.get_rng_state())  # collective: every rank calls it
        if not parallel.is_main:
            return
    save_checkpoint(ckpt.directory, step, model=model, optimizer=opt, scheduler=sched, extra=extra)


def _add_grades_details(result: MethodResult, opt) -> None:
    s = opt.summary()
    result.frozen_ratio = s["frozen_ratio"]
    result.summary = {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool))}
    result.components = [{"name": c.name, "kind": c.kind, "numel": c.numel,
                          "frozen_at_step": c.frozen_at_step} for c in opt.components]
    result.history = [r._asdict() for r in opt.history]
