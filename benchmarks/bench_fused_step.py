"""The fused GradES step (metric + masked AdamW in one pass) vs ``torch.optim.AdamW(fused=True)``.

Target P2 (BASELINES.md): the fused GradES step >= 1.3x faster than ``torch.optim.AdamW(fused=True)``
on the Qwen3-0.6B and Qwen2.5-1.5B sets, and its time proportional to the live (unfrozen) bytes.

Workload: the q/k/v/o/gate/up/down projection matrices of each set (``bench_tensor_sums.MODEL_SETS``)
as fp32 params, grads and moments (random normal data), at 0 %, 50 % and 87.5 % of the layers
frozen (the first ``round(f x layers)`` layers; the CSV records the frozen fraction of bytes).
Bytes counted per live element: 28 (read p, g, m, v; write p, m, v); copy bandwidth (read +
written bytes of a device-to-device copy) is measured in the same run.

Providers:
  torch-fused   torch.optim.AdamW(fused=True) over the live params only (what GradES's reference
                path runs: frozen matrices hidden from the inner optimizer)
  grades-fused  grades_optim.kernels.fused_adamw.fused_adamw_step over all matrices with per-tensor
                active flags (frozen ones return at once), Σ|grad| per matrix from the same pass,
                as at a check step (the metric's finish launch included)
  torch-fused+copy-wdelta   a weight_delta_l1 check on the reference path: copy the live weights,
                torch-fused step, Σ|W_t − W_{t−1}| per matrix
  grades-fused-wdelta       the fused step with ord=3: Σ|W_t − W_{t−1}| of the stored values from
                the update's own pass (no copy)

Usage:
  python benchmarks/bench_fused_step.py                 # GPU, CSV + markdown to benchmarks/results/
  python benchmarks/bench_fused_step.py --quick --out /tmp/x   # seconds on CPU, tiny shapes

``--quick`` shrinks every matrix 32x per side and keeps 8 layers; without CUDA it runs the kernel
under ``TRITON_INTERPRET=1`` (a correctness smoke run: interpreter timings mean nothing; its files
get a ``_quick`` suffix and are not to be committed).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (MODEL_SETS, ROOT, copy_gbps, gpu_or_quick, parse_sets, projection_shapes,  # noqa: E402
                    run_context, time_ms, write_outputs)

FROZEN = (0.0, 0.5, 0.875)
SETS = ("qwen3-0.6b", "qwen2.5-1.5b")
BYTES_PER_ELEMENT = 28
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _frozen_flags(n_tensors: int, layers: int, frac: float) -> list[bool]:
    per_layer = n_tensors // layers
    frozen_layers = round(frac * layers)
    return [i // per_layer >= frozen_layers for i in range(n_tensors)]


def _check_kernel(F, params, grads, device) -> None:
    """Refuse to time a wrong kernel: one step on a few matrices against torch.optim.AdamW."""
    ps = [p[:64].clone() for p in params[:3]]
    gs = [g[:64].clone() for g in grads[:3]]
    ref = [torch.nn.Parameter(p.clone()) for p in ps]
    for r, g in zip(ref, gs):
        r.grad = g.clone()
    torch.optim.AdamW(ref, foreach=False, **HYPER).step()
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    F.fused_adamw_step(ps, gs, m, v, steps, [True] * 3, lr=HYPER["lr"], beta1=HYPER["betas"][0],
                       beta2=HYPER["betas"][1], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds, CPU allowed")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of " + ",".join(MODEL_SETS))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    args = parser.parse_args(argv)

    cuda, device = gpu_or_quick(parser, args.quick)
    from grades_optim import kernels

    reason = kernels.available(device)
    if reason is not None:
        parser.error(f"the fused kernel cannot run here: {reason}")
    import triton

    from grades_optim.kernels import fused_adamw as F
    from grades_optim.kernels.dispatch import torch_tensor_delta_sums

    sets = parse_sets(parser, args.sets)
    context = run_context(device, cuda, args.quick, triton.__version__)
    copy_bytes = (8 << 20) if args.quick else (2 << 30)
    copy = copy_gbps(device, copy_bytes, args.reps)
    rows = [dict(kernel_name="copy", provider="torch.copy_", model_set="-", frozen_pct=0.0, n_tensors=1,
                 n_elements=copy_bytes // 4, live_elements=copy_bytes // 4, metric_name="bandwidth",
                 metric_unit="GB/s", y_50=copy[0], y_20=copy[1], y_80=copy[2], **context)]
    table = []
    for name in sets:
        # quick: 8 layers, so that 87.5 % is exactly 7 frozen layers
        shrink, layers = (32, 8) if args.quick else (1, MODEL_SETS[name]["layers"])
        shapes = projection_shapes(MODEL_SETS[name], shrink, layers)
        gen = torch.Generator(device=device).manual_seed(0)
        params = [torch.randn(s, generator=gen, device=device) * 0.02 for s in shapes]
        grads = [torch.randn(s, generator=gen, device=device) * 1e-3 for s in shapes]
        _check_kernel(F, params, grads, device)
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        n_el = sum(p.numel() for p in params)
        for frac in FROZEN:
            active = _frozen_flags(len(params), layers, frac)
            live_el = sum(p.numel() for p, a in zip(params, active) if a)
            live_bytes = live_el * BYTES_PER_ELEMENT
            live = [torch.nn.Parameter(p, requires_grad=False) for p, a in zip(params, active) if a]
            for lp, g, a in zip(live, [g for g, a in zip(grads, active) if a], active):
                lp.grad = g
            torch_opt = torch.optim.AdamW(live, fused=True, **HYPER)
            kw = dict(lr=HYPER["lr"], beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"])

            def copy_step_delta(opt=torch_opt, live=live):
                # the reference path's weight_delta_l1 check: copy the live weights, step, Σ|ΔW|
                before = [p.detach().clone() for p in live]
                opt.step()
                return torch_tensor_delta_sums([p.detach() for p in live], before, 1)

            providers = {
                "torch-fused": torch_opt.step,
                "grades-fused": lambda: F.fused_adamw_step(params, grads, m, v, steps, active, **kw),
                "torch-fused+copy-wdelta": copy_step_delta,
                "grades-fused-wdelta": lambda: F.fused_adamw_step(params, grads, m, v, steps, active, ord=3, **kw),
            }
            base = dict(kernel_name="adamw_step", model_set=name, frozen_pct=100 * (1 - live_el / n_el),
                        n_tensors=len(params), n_elements=n_el, live_elements=live_el, **context)
            times = {}
            for prov, fn in providers.items():
                ms = time_ms(fn, device, args.reps)
                times[prov] = ms[0]
                gbps = [live_bytes / (t * 1e-3) / 1e9 for t in (ms[0], ms[2], ms[1])]
                pct = [100 * g / copy[0] for g in gbps]
                for metric, unit, ys in (("time", "ms", ms), ("bandwidth", "GB/s", gbps), ("pct_of_copy", "%", pct)):
                    rows.append(dict(base, provider=prov, metric_name=metric, metric_unit=unit,
                                     y_50=ys[0], y_20=ys[1], y_80=ys[2]))
                table.append([name, base["frozen_pct"], prov, ms[0], gbps[0], pct[0]])
            for row in table[-len(providers):]:
                row.append(times["torch-fused"] / row[3])
            del torch_opt, live
        del params, grads, m, v
        if cuda:
            torch.cuda.empty_cache()

    stem = "bench_fused_step" + ("_quick" if args.quick else "")
    csv_name = f"{stem}.csv"
    fields = ["kernel_name", "provider", "model_set", "frozen_pct", "n_tensors", "n_elements", "live_elements",
              "metric_name", "metric_unit", "y_50", "y_20", "y_80", "device_name", "torch_version", "triton_version",
              "git_commit", "timestamp", "mode", "interpreter"]
    line = (f"{context['device_name']}, torch {context['torch_version']}, triton {context['triton_version']}, "
            f"commit {context['git_commit']}, {context['timestamp']}; fp32 params/grads/moments (randn, seed 0), "
            f"{BYTES_PER_ELEMENT} B per live element; copy {copy[0]:,.0f} GB/s (read+write, {copy_bytes >> 20} MiB "
            "fp32); " + ("TRITON_INTERPRET=1: Triton timings are meaningless; " if not cuda else "")
            + ("--quick: shapes /32 per side, 8 layers; " if args.quick else "") + f"CSV: {csv_name}")
    md = [f"# Fused GradES step vs torch.optim.AdamW(fused=True) ({context['mode']} run)", "", line, "",
          "| set | frozen (bytes) | provider | ms (p50) | live GB/s | % of copy | speed-up vs torch-fused |",
          "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    md += [f"| {s} | {fr:.1f}% | {p} | {ms:.3f} | {g:,.0f} | {pc:.0f}% | {sp:.2f}x |" for s, fr, p, ms, g, pc, sp in table]
    write_outputs(args.out, stem, fields, rows, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
