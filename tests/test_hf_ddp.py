"""HF Trainer's own DDP under torchrun (2 gloo ranks): GradES picks the skip mode (Trainer builds DDP
after the optimizer), both ranks freeze the same matrices at the same steps, stay identical and
stop early. Hard time limit; the launch's process group is killed on exit."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 120


def test_trainer_ddp_ranks_agree_and_stop_early(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.hf_ddp_worker", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun exceeded {LIMIT_S}s:\n{log[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, log[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["ddp"] == "DistributedDataParallel"
    assert r0["freeze_mode"] == r1["freeze_mode"] == "skip"
    assert r0["frozen"] == r1["frozen"] and all(s is not None for s in r0["frozen"].values())
    assert r0["params"] == r1["params"]  # DDP kept the replicas identical through the freezes
    assert r0["should_stop"] and r0["global_step"] < r0["max_steps"]
