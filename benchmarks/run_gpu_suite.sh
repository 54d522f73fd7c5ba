#!/usr/bin/env bash
# One call on a GPU machine: environment, the CUDA tests, then the P1/P2/P3 benchmarks.
# Usage (device tool): bash benchmarks/run_gpu_suite.sh "$OUT"
# Everything is written under OUT (logs, CSV, markdown); copy the markdown/CSV of a real run into
# benchmarks/results/ afterwards. Leaves the card's settings alone.
set -uo pipefail
FINAL="${1:-${OUT:-/tmp/gpu-out}}"
OUT=/tmp/grades-gpu-work  # everything lands here; FINAL gets 3 files (the device tool returns at most 8)
mkdir -p "$OUT" "$FINAL"
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 --version
} > "$OUT/context.txt" 2>&1
# The GPU image already holds torch, triton, transformers, pytest and hypothesis and reaches no
# network: install only this package, offline (kernels/ is mapped to grades_optim.kernels).
python3 -m pip -q install --disable-pip-version-check --no-deps --no-build-isolation --no-index -e . \
  > "$OUT/install.log" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$OUT/context.txt" 2>&1
# Correctness first: the CUDA tests (kernels compiled, sync-free non-check steps) and the fused path.
timeout 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_fused_step.py tests/test_optimizer_triton.py \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/context.txt"
for b in bench_tensor_sums bench_fused_step bench_train_step; do
  timeout 200 python3 "benchmarks/$b.py" --out "$OUT" > "$OUT/$b.log" 2>&1; echo "$b rc=$?" >> "$OUT/context.txt"
done
tar czf "$FINAL/gpu_results.tgz" -C "$OUT" .
cp "$OUT/context.txt" "$OUT/tests.log" "$FINAL/"
cat "$OUT/context.txt"; tail -3 "$OUT/tests.log"; cat "$OUT"/*.md 2>/dev/null
