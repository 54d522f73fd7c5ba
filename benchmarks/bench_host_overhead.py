"""Host cost of the wrapper itself (issue 11): CPU time of ``GradESOptimizer.step`` minus its inner step.

N components, each one tiny parameter (2x2: the arithmetic is negligible, so what is timed is the
wrapper's Python work), an AdamW inner optimizer, one thread. Rows:

* ``step`` — per metric (and ``impl="auto"`` vs ``"torch"`` for grad_l1), check and non-check steps
  (``check_interval=2``), with 0 / half / all-but-one components frozen. Frozen components are made
  by zero gradients before the timed steps (they read 0 and freeze at the first check), through
  the public API only.
* ``fused_prep`` — the fused AdamW path (``impl="triton"``, interpreter) with the kernel launch
  stubbed out: its host preparation per step (plan cache, bias corrections, validation).
* ``construct`` / ``state_dict`` / ``load_state_dict`` — one call each.
* ``history`` — bytes kept by ``record_history`` per record and after 10,000 checks at N=200.

Figures are µs of CPU time (``time.thread_time``) per component, medians over interleaved rounds.
Targets (issue 11, N = 1,000): non-check ≤ 0.5, check ≤ 5, fused prep on a plan-cache hit ≤ 1.

    python benchmarks/bench_host_overhead.py            # N = 50, 200, 1000, 5000 (~5 min on 2 cores)
    python benchmarks/bench_host_overhead.py --quick    # smoke run (CI)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import time
import tracemalloc

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import: fused_prep runs on CPU tensors

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import git_commit  # noqa: E402

from grades_optim import GradESOptimizer  # noqa: E402

METRICS = ("grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1", "update_snr")
FROZEN = {"none": 0.0, "half": 0.5, "all_but_one": None}


class _Timed:
    """Wraps the inner optimizer's ``step`` so its CPU time can be taken out of the wrapper's."""

    def __init__(self, fn):
        self.fn, self.spent = fn, 0.0

    def __call__(self, *a, **k):
        t0 = time.thread_time()
        try:
            return self.fn(*a, **k)
        finally:
            self.spent += time.thread_time() - t0


def build(n: int, metric: str, impl: str, frozen: str, **kw):
    """A wrapper over n tiny components with the requested part frozen (by zero gradients)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(2, 2)) for _ in range(n)]
    inner = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def wrap(impl):
        return GradESOptimizer(inner, components={f"layers.{i}.q_proj": p for i, p in enumerate(params)},
                               tau=1e-9, tau_mode="absolute", metric=metric, reduction="mean", grace_steps=0,
                               check_interval=2, patience=1, ema=0.0, impl=impl, **kw)

    # the fused path's launch is stubbed (its readings would be fake): freeze on the reference path,
    # then hand the state over to a fused-path wrapper through the public state dict
    opt = wrap("torch" if impl == "triton" else impl)
    k = n - 1 if FROZEN[frozen] is None else int(FROZEN[frozen] * n)
    opt.bench_grads = [(torch.ones_like(p), -torch.ones_like(p)) for p in params[k:]]
    for s in range(4):  # two checks: grad_delta_l1 needs two readings of the zero gradients
        for p in params[:k]:
            p.grad = torch.zeros_like(p)
        set_grads(opt, params[k:], s)
        opt.step()
    assert opt.summary()["frozen"] == k, (metric, frozen, opt.summary())
    if impl == "triton":
        sd, pairs = opt.state_dict(), opt.bench_grads
        opt = wrap(impl)
        opt.load_state_dict(sd)
        opt.bench_grads = pairs
    opt.bench_live = params[k:]
    inner.step = _Timed(inner.step)  # the wrapper calls self._inner.step(): an instance attribute wins
    return opt, params


def set_grads(opt, live, s: int) -> None:
    # +1 / -1 in turn: every metric reads a non-zero value, so nothing live freezes while timed.
    # Written into the same buffer: stable gradient addresses, as the caching allocator gives.
    for p, pair in zip(live, opt.bench_grads):
        if p.grad is None:
            p.grad = pair[s % 2].clone()
        else:
            p.grad.copy_(pair[s % 2])


def time_steps(opt, steps: int) -> tuple[list, list]:
    """Per step CPU µs of the wrapper's own work, split into (check, non-check) steps."""
    check, other = [], []
    timed = opt.optimizer.step
    for s in range(steps):
        set_grads(opt, opt.bench_live, s)
        before = timed.spent
        t0 = time.thread_time()
        opt.step()
        own = (time.thread_time() - t0) - (timed.spent - before)
        (check if opt.step_count % opt.check_interval == 0 else other).append(own * 1e6)
    return check, other


def stub_launch():
    """Replace the fused kernels' launch by a zero result: what remains is the host preparation."""
    from grades_optim.kernels import step_plan

    def launch(plan, flags, metric, n, device, launch_group):
        # ones, not zeros: a zero reading would freeze every live component at the first check
        return torch.ones(n, dtype=torch.float32, device=device) if metric else None

    step_plan.launch = launch


def history_bytes(n: int, checks: int) -> float:
    """Bytes retained per history record (tracemalloc, after ``checks`` checks)."""
    opt, _ = build(n, "grad_l1", "torch", "none", record_history=True)
    opt.history.clear()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for s in range(2 * checks):
        set_grads(opt, opt.bench_live, s)
        opt.step()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / max(1, len(opt.history)), len(opt.history)


def one_call_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append((time.thread_time() - t0) * 1e6)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N, few steps (smoke test)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("grades_optim").setLevel(logging.ERROR)  # the guards rightly warn about this setup
    sizes = args.sizes or ([20, 50] if args.quick else [50, 200, 1000, 5000])
    rounds = args.reps or (2 if args.quick else 5)
    steps = 4 if args.quick else 10
    stub_launch()
    rows = []
    for n in sizes:
        configs = {}
        for metric in METRICS:
            for frozen in FROZEN:
                configs[("step", metric, "torch", frozen)] = build(n, metric, "torch", frozen)
        for frozen in FROZEN:
            configs[("step", "grad_l1", "auto", frozen)] = build(n, "grad_l1", "auto", frozen)
            configs[("fused_prep", "grad_l1", "triton", frozen)] = build(n, "grad_l1", "triton", frozen)
        samples = {key: ([], []) for key in configs}
        for _ in range(rounds):  # interleaved: machine drift hits every configuration alike
            for key, (opt, _) in configs.items():
                c, o = time_steps(opt, steps)
                samples[key][0].extend(c)
                samples[key][1].extend(o)
        for (kind, metric, impl, frozen), (c, o) in samples.items():
            opt = configs[(kind, metric, impl, frozen)][0]
            if kind == "fused_prep":
                assert opt.fast_path is not None, opt.fast_path_reason
            for step_kind, xs in (("check", c), ("non_check", o)):
                rows.append(dict(kind=kind, n=n, metric=metric, impl=impl, frozen=frozen, step=step_kind,
                                 us_per_component=statistics.median(xs) / n, us_per_step=statistics.median(xs)))
        opt, params = build(n, "grad_l1", "torch", "none")
        sd = opt.state_dict()
        inner = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        comps = {f"layers.{i}.q_proj": p for i, p in enumerate(params)}

        def construct():
            GradESOptimizer(inner, components=comps, tau=1e-3, metric="grad_l1", impl="torch")

        for kind, fn in (("construct", construct), ("state_dict", opt.state_dict),
                         ("load_state_dict", lambda: opt.load_state_dict(sd))):
            us = one_call_us(fn, rounds)
            rows.append(dict(kind=kind, n=n, metric="grad_l1", impl="torch", frozen="none", step="-",
                             us_per_component=us / n, us_per_step=us))
    per_record, kept = history_bytes(50 if args.quick else 200, 20 if args.quick else 200)
    context = dict(git_commit=git_commit(), torch_version=torch.__version__, threads=1,
                   timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), mode="quick" if args.quick else "full",
                   rounds=rounds, steps_per_round=steps, machine="this project's CPU machine (2 cores)")
    result = dict(context=context, rows=rows, history=dict(bytes_per_record=per_record, records_kept=kept))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "host_overhead_quick" if args.quick else "host_overhead"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(render(result) + "\n")
    print(render(result))
    return result


def render(result: dict) -> str:
    ctx = result["context"]
    sizes = sorted({r["n"] for r in result["rows"]})
    cell = {(r["kind"], r["metric"], r["impl"], r["frozen"], r["step"], r["n"]): r["us_per_component"]
            for r in result["rows"]}
    out = [f"# Host cost of the wrapper (µs of CPU time per component per step, medians)", "",
           f"commit {ctx['git_commit']}, torch {ctx['torch_version']}, {ctx['machine']}, {ctx['threads']} thread, "
           f"{ctx['mode']} mode, {ctx['rounds']} interleaved rounds x {ctx['steps_per_round']} steps, {ctx['timestamp']}. "
           "Targets at N = 1,000: non-check <= 0.5, check <= 5, fused prep (cache hit) <= 1.", "",
           "| kind | metric | impl | frozen | step | " + " | ".join(f"N={n}" for n in sizes) + " |",
           "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in sizes) + " |"]
    keys = sorted({k[:5] for k in cell}, key=lambda k: (k[0] != "step", k[0], k[1], k[2], k[4], list(FROZEN).index(k[3])))
    for k in keys:
        vals = [cell.get((*k, n)) for n in sizes]
        out.append("| " + " | ".join(k) + " | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    h = result["history"]
    out += ["", f"history: {h['bytes_per_record']:.0f} bytes per record ({h['records_kept']} records kept); "
            f"10,000 checks at N=200 would keep {h['bytes_per_record'] * 2e6 / 2**20:.0f} MiB unbounded."]
    return "\n".join(out)


if __name__ == "__main__":
    main()
