"""P4: training-step time of a MiniLM-sized BERT with GradESOptimizer (nothing frozen) vs bare AdamW.

Both run in the same process on identical copies of a random-init model, alternating blocks of
steps so that machine drift hits both alike. Each step is forward + backward + optimizer step +
zero_grad; the wrapper measures every component at every step (check_interval=1, the default),
so this is the worst case for monitoring overhead. Target P4 (BASELINES.md): ratio <= 1.03.

    python benchmarks/bench_step_overhead.py            # the real measurement (~3 min on 2 cores)
    python benchmarks/bench_step_overhead.py --quick    # tiny smoke run (CI)
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

from grades_optim import GradESOptimizer

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import git_commit  # noqa: E402


def build_model(quick: bool, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if quick:
        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    else:  # all-MiniLM-L6-v2's shape
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512)
    return BertForSequenceClassification(cfg).train(), cfg


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 10, quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default 10, quick 2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 10)
    steps = args.steps or (2 if args.quick else 10)
    batch, seq = (4, 16) if args.quick else (args.batch, args.seq)

    model_a, cfg = build_model(args.quick, args.seed)
    model_b = copy.deepcopy(model_a)
    bare = torch.optim.AdamW(model_a.parameters(), lr=2e-5)
    wrapped = GradESOptimizer(torch.optim.AdamW(model_b.parameters(), lr=2e-5), model=model_b,
                              tau=1e-30)  # never freezes: pure monitoring overhead
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)

    def run(model, opt, n):
        t0 = time.perf_counter()
        for _ in range(n):
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / n

    run(model_a, bare, 2)
    run(model_b, wrapped, 2)  # warm-up: allocator, thread pools, first-step state init
    times = {"bare_adamw": [], "grades_wrapper": []}
    for r in range(rounds):
        order = [("bare_adamw", model_a, bare), ("grades_wrapper", model_b, wrapped)]
        for name, model, opt in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(model, opt, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["grades_wrapper"] / med["bare_adamw"]
    context = (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, Python {platform.python_version()}, "
               f"{'tiny BERT (quick)' if args.quick else 'MiniLM-L6-sized BERT (random init)'}, "
               f"batch {batch} x {seq} tokens, AdamW fp32, {rounds} rounds x {steps} steps alternating, "
               f"{len(wrapped.components)} components measured every step, commit {git_commit()}, "
               f"{datetime.date.today().isoformat()}")
    result = {"bare_ms": med["bare_adamw"] * 1e3, "wrapper_ms": med["grades_wrapper"] * 1e3,
              "ratio": ratio, "context": context}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "step_overhead_quick" if args.quick else "step_overhead"
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["provider", "round", "ms_per_step", "context"])
        for name, vals in times.items():
            for r, v in enumerate(vals):
                w.writerow([name, r, f"{v * 1e3:.3f}", context])
    table = (f"{context}\n\n| provider | median ms/step |\n| --- | --- |\n"
             f"| bare `torch.optim.AdamW` | {result['bare_ms']:.1f} |\n"
             f"| `GradESOptimizer(AdamW)`, nothing frozen | {result['wrapper_ms']:.1f} |\n"
             f"| **ratio** (target P4 <= 1.03) | **{ratio:.3f}** |\n")
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
