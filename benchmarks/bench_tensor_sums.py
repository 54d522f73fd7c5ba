"""Per-matrix gradient L1 sums: Python loop vs ``torch._foreach_norm`` vs the one-launch Triton kernel.

Target P1 (BASELINES.md): the Triton reduction at >= 90 % of the copy bandwidth measured in the
same run on all three sets, and >= 2.5x ``_foreach_norm`` on the Qwen3-0.6B set.

Workload: the q/k/v/o/gate/up/down projection matrices of Qwen3-0.6B (196 matrices, 440M
elements), Qwen2.5-1.5B (196, 1.31B) and Llama-3.1-8B (224, 6.98B) as bf16 gradients (random
normal data), fp32 per-matrix results. Bytes counted: one read of every gradient (2 B/element);
copy bandwidth counts read + written bytes of a device-to-device copy.

Providers (baselines come from the library's own torch paths, never re-implemented here):
  loop       grades_optim.magnitudes._single_tensor_sums (per matrix: upcast, abs, sum; stack)
  foreach    grades_optim.kernels.dispatch.torch_tensor_sums (_foreach_norm(ord=1, fp32) + stack)
  triton-<c> grades_optim.kernels.tensor_sums.tensor_sums with chunk_size=c

Usage:
  python benchmarks/bench_tensor_sums.py                 # GPU, all sets, CSV + markdown to benchmarks/results/
  python benchmarks/bench_tensor_sums.py --quick --out /tmp/x   # seconds on CPU, tiny shapes

``--quick`` shrinks every matrix 32x per side and keeps 2 layers. Without CUDA it runs on CPU
and times the Triton provider under ``TRITON_INTERPRET=1`` (a correctness smoke run: interpreter
timings mean nothing); its files get a ``_quick`` suffix and are not to be committed.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (COPY_BYTES, MODEL_SETS, ROOT, copy_gbps, gpu_or_quick, parse_sets,  # noqa: E402
                    projection_shapes, run_context, time_ms, write_outputs)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds, CPU allowed")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--sets", default=",".join(MODEL_SETS), help="comma-separated subset of " + ",".join(MODEL_SETS))
    parser.add_argument("--chunk-sizes", default=None, help="Triton chunk sizes to sweep (default 16384,32768,65536)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    args = parser.parse_args(argv)

    cuda, device = gpu_or_quick(parser, args.quick)
    from grades_optim import kernels
    from grades_optim.kernels import dispatch
    from grades_optim.magnitudes import _single_tensor_sums

    reason = kernels.available(device)
    if reason is None:
        import triton

        from grades_optim.kernels import tensor_sums as K
        triton_version = triton.__version__
    else:
        K, triton_version = None, "n/a"
        print(f"triton provider skipped: {reason}", file=sys.stderr)

    chunks = [int(c) for c in (args.chunk_sizes or ("4096" if args.quick else "16384,32768,65536")).split(",")]
    sets = parse_sets(parser, args.sets)
    context = run_context(device, cuda, args.quick, triton_version)
    copy_bytes = (8 << 20) if args.quick else COPY_BYTES
    copy = copy_gbps(device, copy_bytes, args.reps)
    rows = [dict(kernel_name="copy", provider="torch.copy_", model_set="-", n_tensors=1, n_elements=copy_bytes // 4,
                 dtype="float32", metric_name="bandwidth", metric_unit="GB/s",
                 y_50=copy[0], y_20=copy[1], y_80=copy[2], **context)]
    table = []
    for name in sets:
        shapes = projection_shapes(MODEL_SETS[name], *((32, 2) if args.quick else (1, None)))
        gen = torch.Generator(device=device).manual_seed(0)
        grads = [torch.randn(s, generator=gen, device=device, dtype=torch.bfloat16) for s in shapes]
        n_el = sum(g.numel() for g in grads)
        nbytes = n_el * grads[0].element_size()
        want = dispatch.torch_tensor_sums(grads, 1)
        providers = {"loop": lambda: _single_tensor_sums(grads, 1),
                     "foreach": lambda: dispatch.torch_tensor_sums(grads, 1)}
        if K is not None:
            for c in chunks:
                got = K.tensor_sums(grads, 1, chunk_size=c)
                # Refuse to time a wrong kernel: fp32 sums of ~1e7 terms agree to ~1e-4 relative.
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
                providers[f"triton-{c}"] = (lambda c=c: K.tensor_sums(grads, 1, chunk_size=c))
        base = dict(kernel_name="tensor_sums_l1", model_set=name, n_tensors=len(grads), n_elements=n_el,
                    dtype="bfloat16", **context)
        for prov, fn in providers.items():
            ms = time_ms(fn, device, args.reps)
            gbps = [nbytes / (m * 1e-3) / 1e9 for m in (ms[0], ms[2], ms[1])]
            pct = [100 * g / copy[0] for g in gbps]
            for metric, unit, ys in (("time", "ms", ms), ("bandwidth", "GB/s", gbps), ("pct_of_copy", "%", pct)):
                rows.append(dict(base, provider=prov, metric_name=metric, metric_unit=unit,
                                 y_50=ys[0], y_20=ys[1], y_80=ys[2]))
            table.append((name, len(grads), n_el, prov, ms[0], gbps[0], pct[0]))
        del grads
        if cuda:
            torch.cuda.empty_cache()

    stem = "bench_tensor_sums" + ("_quick" if args.quick else "")
    csv_name = f"{stem}.csv"
    fields = ["kernel_name", "provider", "model_set", "n_tensors", "n_elements", "dtype", "metric_name",
              "metric_unit", "y_50", "y_20", "y_80", "device_name", "torch_version", "triton_version", "git_commit",
              "timestamp", "mode", "interpreter"]
    line = (f"{context['device_name']}, torch {context['torch_version']}, triton {triton_version}, "
            f"commit {context['git_commit']}, {context['timestamp']}; bf16 gradients (randn, seed 0), fp32 results; "
            f"copy {copy[0]:,.0f} GB/s (read+write, {copy_bytes >> 20} MiB fp32); "
            + ("TRITON_INTERPRET=1: Triton timings are meaningless; " if not cuda else "")
            + ("--quick: shapes /32 per side, 2 layers; " if args.quick else "") + f"CSV: {csv_name}")
    md = [f"# Per-matrix gradient L1 sums ({context['mode']} run)", "", line, "",
          "| set | matrices | elements | provider | ms (p50) | GB/s | % of copy |", "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    md += [f"| {s} | {n} | {e:,} | {p} | {m:.3f} | {g:,.0f} | {pc:.0f}% |" for s, n, e, p, m, g, pc in table]
    write_outputs(args.out, stem, fields, rows, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
