"""Smoke runs of the benchmark scripts' ``--quick`` mode, so they do not rot between GPU runs."""
import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_quick(script: str, out: pathlib.Path) -> subprocess.CompletedProcess:
    # The script picks its own mode (interpreter on CPU, compiled on CUDA); a TRITON_INTERPRET
    # left in this process by tests/test_kernels.py must not decide for it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--reps", "2",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)


def test_bench_tensor_sums_quick(tmp_path):
    proc = _run_quick("bench_tensor_sums.py", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (tmp_path / "bench_tensor_sums_quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows if r["kernel_name"] == "tensor_sums_l1"}
    # triton is a CI dependency: its provider must have run (and passed its correctness gate).
    assert {"loop", "foreach", "triton-4096"} <= providers, providers
    assert {r["model_set"] for r in rows} >= {"qwen3-0.6b", "qwen2.5-1.5b", "llama3.1-8b"}
    assert all(float(r["y_50"]) > 0 for r in rows)
    md = (tmp_path / "bench_tensor_sums_quick.md").read_text()
    assert "torch " in md and "| set |" in md


def test_bench_fused_step_quick(tmp_path):
    proc = _run_quick("bench_fused_step.py", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # includes the kernel-vs-torch gate
    with (tmp_path / "bench_fused_step_quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["kernel_name"] == "adamw_step" and r["metric_name"] == "time"]
    assert {r["provider"] for r in steps} == {"torch-fused", "grades-fused", "torch-fused+copy-wdelta",
                                              "grades-fused-wdelta"}
    assert {r["model_set"] for r in steps} == {"qwen3-0.6b", "qwen2.5-1.5b"}
    assert {round(float(r["frozen_pct"]), 1) for r in steps} == {0.0, 50.0, 87.5}
    assert any(r["kernel_name"] == "copy" for r in rows) and all(float(r["y_50"]) > 0 for r in rows)
    md = (tmp_path / "bench_fused_step_quick.md").read_text()
    assert "torch " in md and "| set | frozen (bytes) |" in md


def test_bench_train_step_quick(tmp_path):
    proc = _run_quick("bench_train_step.py", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (tmp_path / "bench_train_step_quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["bare", "grades", "grades-ci8"]
    assert all(float(r["ms_per_step"]) > 0 and int(r["components"]) == 14 for r in rows)
    assert "| provider | ms/step (median) |" in (tmp_path / "bench_train_step_quick.md").read_text()


def test_study_decisions_quick(tmp_path):
    """The decisions study (issue 10): every method of a setup, the truncation baseline, the report."""
    script = str(ROOT / "benchmarks" / "study_decisions.py")
    for args in (["study", "--setup", "rt", "--seeds", "0", "--variants", "defaults", "released"],
                 ["probe", "--setup", "rt"]):
        proc = subprocess.run([sys.executable, script, *args, "--quick", "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    rec = json.loads((tmp_path / "decisions.json").read_text())["runs"]["rt/0"]
    stops = {rec[f"grades[{v}]"]["steps"] for v in ("defaults", "released")}
    assert {"full", "classic-es"} <= set(rec) and all(f"truncated@{s}" in rec for s in stops)
    # full scored at every GradES stop step (a stop at the planned end is its final score)
    assert all(str(s) in rec["full"]["at"] or s == rec["planned_steps"] for s in stops)
    assert all(rec[f"truncated@{s}"]["steps"] == s for s in stops)
    md = (tmp_path / "decisions.md").read_text()
    assert md.count("| rt | 1 |") == 2, md
    probe = json.loads((tmp_path / "decisions_probe_rt.json").read_text())
    assert len(probe["rows"]) == probe["total"] and probe["metric_names"][2] == "update_snr"
    # the open-loop peak_gate screen: a gate only withholds "converged" readings, so per component
    # a tighter gate freezes at the same step or later (never earlier, never more components)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import study_decisions
    finally:
        sys.path.pop(0)
    late = float("inf")
    for tau in (0.2, 0.3, 0.4):
        runs = [study_decisions.freezes_open_loop(probe, tau, peak_gate=g) for g in (0.0, 0.9, 0.8, 0.5)]
        for looser, tighter in zip(runs, runs[1:]):
            assert all((late if b is None else b) >= (late if a is None else a) for a, b in zip(looser, tighter))
    proc = subprocess.run([sys.executable, script, "render", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gate 0.8" in (tmp_path / "decisions.md").read_text()


def test_bench_host_overhead_quick(tmp_path):
    """Issue 11's table: every metric, check and non-check steps, frozen shares, fused prep, state dicts."""
    proc = _run_quick("bench_host_overhead.py", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    result = json.loads((tmp_path / "host_overhead_quick.json").read_text())
    rows = result["rows"]
    steps = {(r["metric"], r["impl"], r["frozen"], r["step"]) for r in rows if r["kind"] == "step"}
    assert {(m, "torch", f, s) for m in ("grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1", "update_snr")
            for f in ("none", "half", "all_but_one") for s in ("check", "non_check")} <= steps
    assert {r["kind"] for r in rows} == {"step", "fused_prep", "construct", "state_dict", "load_state_dict"}
    assert all(r["us_per_step"] > 0 for r in rows) and result["history"]["bytes_per_record"] > 0
    assert "| kind | metric | impl | frozen | step |" in (tmp_path / "host_overhead_quick.md").read_text()
