"""What the GPU benchmark scripts share: model shapes, timing, copy bandwidth, run context, output.

Imported by the scripts in this folder (they put it on ``sys.path``); not part of the package.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import statistics
import subprocess
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (out_features, in_features) per projection, from the models' public config.json files.
MODEL_SETS = {
    "qwen3-0.6b": dict(layers=28, hidden=1024, q=16 * 128, kv=8 * 128, inter=3072),
    "qwen2.5-1.5b": dict(layers=28, hidden=1536, q=12 * 128, kv=2 * 128, inter=8960),
    "llama3.1-8b": dict(layers=32, hidden=4096, q=32 * 128, kv=8 * 128, inter=14336),
}
QUANTILES = [0.5, 0.2, 0.8]
COPY_BYTES = 2 << 30  # 2 GiB source: far beyond L2 (50-60 MB), so the copy streams from HBM


def projection_shapes(cfg: dict, shrink: int = 1, layers: int | None = None) -> list[tuple[int, int]]:
    h, q, kv, i = (cfg[k] // shrink for k in ("hidden", "q", "kv", "inter"))
    per_layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    return per_layer * (layers or cfg["layers"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int) -> list[float]:
    """[p50, p20, p80] milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench  # flushes L2 between runs and times with CUDA events

        return list(do_bench(fn, quantiles=QUANTILES))
    fn()  # warm-up (first interpreter call parses the kernel)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return [statistics.median(times), qs[1], qs[7]]


def copy_gbps(device: torch.device, nbytes: int, reps: int) -> list[float]:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    # read + write; p20 of time is p80 of bandwidth, so the order flips.
    return [2 * nbytes / (m * 1e-3) / 1e9 for m in (ms[0], ms[2], ms[1])]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "--", "kernels", "benchmarks"], cwd=ROOT).returncode
    return out.stdout.strip() + ("-dirty" if dirty else "")


def gpu_or_quick(parser: argparse.ArgumentParser, quick: bool) -> tuple[bool, torch.device]:
    """(cuda, device); a full run needs a GPU, ``--quick`` runs Triton interpreted on the CPU."""
    cuda = torch.cuda.is_available()
    if not cuda and not quick:
        parser.error("full runs need a CUDA GPU; use --quick for a CPU smoke run")
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first triton import: @triton.jit reads it
    return cuda, torch.device("cuda" if cuda else "cpu")


def parse_sets(parser: argparse.ArgumentParser, spec: str) -> list[str]:
    sets = [s for s in spec.split(",") if s]
    for s in sets:
        if s not in MODEL_SETS:
            parser.error(f"unknown set {s!r}; choose from {', '.join(MODEL_SETS)}")
    return sets


def run_context(device: torch.device, cuda: bool, quick: bool, triton_version: str) -> dict:
    """The columns every CSV row carries (Liger's long format)."""
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    return dict(device_name=name, torch_version=torch.__version__, triton_version=triton_version,
                git_commit=git_commit(), timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), mode="quick" if quick else "full", interpreter=int(not cuda))


def write_outputs(out: pathlib.Path, stem: str, fields: list[str], rows: list[dict], md: list[str]) -> pathlib.Path:
    """Append ``rows`` to ``<stem>.csv`` (long format, run after run) and write ``<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    return csv_path
