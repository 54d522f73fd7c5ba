"""P3: the cost of GradES monitoring inside a real training step (Qwen3-0.6B shape, bf16).

A Qwen3-0.6B-shaped causal LM (random init, bf16 weights, SDPA) trains on random tokens, batch
8 × 1024. Providers, alternating in one process on identical copies of the model:

  bare           torch.optim.AdamW(fused=True)
  grades         GradESOptimizer(AdamW(fused=True)), nothing frozen, a check every step
                 (check_interval=1: the worst case for monitoring)
  grades-ci8     the same with check_interval=8 (7 of 8 steps do no host sync at all)

Reported: median step time, the monitoring cost (grades − bare) as % of the bare step (target P3:
≤ 0.5%), extra GPU memory held by the wrapper (max_memory_allocated difference; target ≤ 1 MB per
1,000 components), and whether non-check steps ran without a host sync
(``torch.cuda.set_sync_debug_mode("error")`` around them). The released GradES callback measured
21.1 ms per step (12.2%) and held 840 MB on this shape (BASELINES.md).

    python benchmarks/bench_train_step.py                      # on a GPU
    python benchmarks/bench_train_step.py --quick --out /tmp/q # tiny model on CPU (smoke run)
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import ROOT, run_context, write_outputs  # noqa: E402

from grades_optim import GradESOptimizer  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                 tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)


def build(quick: bool, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**(TINY if quick else QWEN3_06B), attn_implementation="sdpa")
    dtype = torch.float32 if quick else torch.bfloat16
    return Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).train(), cfg


def make_opt(model, kind: str, cuda: bool):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    if kind == "bare":
        return inner
    return GradESOptimizer(inner, model=model, tau=1e-30, check_interval=8 if kind == "grades-ci8" else 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, a few seconds")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5, quick 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per provider per round (default 8, quick 2)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        parser.error("full runs need a CUDA GPU; use --quick for a CPU smoke run")
    device = torch.device("cuda" if cuda else "cpu")
    rounds, steps = args.rounds or (2 if args.quick else 5), args.reps or (2 if args.quick else 8)
    batch, seq = (2, 32) if args.quick else (8, 1024)

    base, cfg = build(args.quick, device)
    providers = ("bare", "grades", "grades-ci8")
    models, opts, resident = {}, {}, {}
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen, device=device)

    def one_step(k, sync_check: bool):
        loss = models[k](input_ids=ids, labels=ids).loss
        loss.backward()
        opt = opts[k]
        non_check = isinstance(opt, GradESOptimizer) and (opt.step_count + 1) % opt.check_interval != 0
        if sync_check and cuda and non_check:
            torch.cuda.set_sync_debug_mode("error")  # raises on any host sync inside the step
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    for k in providers:
        # Resident memory of each provider (model copy, grads freed, optimizer state, GradES
        # bookkeeping) after warm-up steps; grades minus bare is what the wrapper holds.
        before = torch.cuda.memory_allocated() if cuda else 0
        models[k] = copy.deepcopy(base)
        opts[k] = make_opt(models[k], k, cuda)
        for _ in range(2):  # warm-up: state init, allocator, kernels compiled
            one_step(k, sync_check=False)
        one_step(k, sync_check=True)  # a non-check step of grades-ci8 must not sync
        resident[k] = (torch.cuda.memory_allocated() - before) if cuda else 0
    del base
    mem = resident
    times = {k: [] for k in providers}
    for r in range(rounds):
        for k in (providers if r % 2 == 0 else providers[::-1]):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                one_step(k, sync_check=False)
            if cuda:
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_comp = len(opts["grades"].components)
    context = run_context(device, cuda, args.quick, "n/a")
    rows, table = [], []
    for k in providers:
        cost = 100 * (med[k] - med["bare"]) / med["bare"]
        extra_mb = (mem[k] - mem["bare"]) / 2**20
        rows.append(dict(provider=k, ms_per_step=med[k], monitoring_pct=cost, extra_mem_mb=extra_mb,
                         components=n_comp, **context))
        table.append(f"| {k} | {med[k]:.1f} | {cost:+.2f}% | {extra_mb:+.1f} MB |")
    line = (f"{context['device_name']}, torch {context['torch_version']}, commit {context['git_commit']}, "
            f"{context['timestamp']}; {'tiny Qwen3 (quick), fp32' if args.quick else 'Qwen3-0.6B shape, random init, bf16, SDPA'}, "
            f"batch {batch} x {seq}, AdamW(fused={cuda}), {n_comp} components, {rounds} rounds x {steps} steps "
            "alternating; non-check steps ran under set_sync_debug_mode('error')" + ("" if cuda else " (CPU: not checked)"))
    md = ["# GradES monitoring inside a training step (P3)", "", line, "",
          "| provider | ms/step (median) | vs bare | extra memory |", "| --- | ---: | ---: | ---: |", *table]
    fields = list(rows[0])
    write_outputs(args.out, "bench_train_step" + ("_quick" if args.quick else ""), fields, rows, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
