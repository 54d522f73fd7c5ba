"""SIGKILL a training process at random steps (and mid checkpoint write), resume, and get exactly
the parameters and freeze timeline of an uninterrupted run (tests/crash_train.py is the loop)."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grades_optim.checkpoint as ckpt
from grades_optim import GradESOptimizer
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "tests.crash_train", str(run_dir), "--step-delay", "0.05", *extra],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(run_dir, timeout=120):
    proc = start(run_dir)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def kill_when(run_dir, marker, *extra, timeout=120):
    """Start (resuming), SIGKILL as soon as ``marker`` is printed; return the steps it printed."""
    proc = start(run_dir, *extra)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == marker:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed at {marker}: {seen[-3:]} {proc.stderr.read()[-2000:]}"
    return seen


def final(run_dir):
    return torch.load(run_dir / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(run_dir)
    return final(run_dir)


def assert_same(a, b):
    assert a["frozen"] == b["frozen"]
    assert repr(a["history"]) == repr(b["history"])
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert torch.equal(a["rng"], b["rng"])


def test_sigkill_at_random_steps_and_mid_write_resumes_bit_identically(reference, tmp_path):
    seed = int(os.environ.get("GRADES_CRASH_SEED") or random.randrange(1 << 30))  # replay a failure
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(1, 12), 1) + rng.sample(range(13, 24), 1) + rng.sample(range(29, 39), 2))
    assert any(s is not None for s in reference["frozen"]), "the run must freeze something to be a test"
    seen = kill_when(tmp_path, f"STEP {kills[0]}")
    assert seen[0] == "STEP 1"
    for k in kills[1:2]:
        seen = kill_when(tmp_path, f"STEP {k}")
        # the checkpoint of step j is written after "STEP j" is printed, so a kill at "STEP k" leaves one
        # only when some multiple of EVERY (4) is below k: the first kill at 1..4 leaves nothing to resume
        assert seen[0] != "STEP 1" or kills[0] <= 4, f"did not resume (seed {seed})"
    kill_when(tmp_path, "WRITING", "--pause-in-write-at", "28")  # killed halfway through a checkpoint
    assert not (tmp_path / "ckpt" / "ckpt-000000028.pt").exists()
    assert list((tmp_path / "ckpt").glob(".ckpt-000000028.pt.tmp-*")), "the torn temporary file is left behind"
    for k in kills[2:]:
        kill_when(tmp_path, f"STEP {k}")
    out = run_to_end(tmp_path)
    assert out.splitlines()[0] != "STEP 1"
    assert_same(final(tmp_path), reference)
    assert not list((tmp_path / "ckpt").glob(".ckpt-*.tmp-*"))  # cleaned up by the next save


def test_torn_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, caplog):
    kill_when(tmp_path, "STEP 29")
    files = ckpt.list_checkpoints(tmp_path / "ckpt")
    assert len(files) == 2  # keep=2: the newest and the one before
    previous = int(files[1].name[5:14])
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) * 2 // 3])  # e.g. a disk that lost the tail
    model = make_model(seed=7)
    # the rule settings of crash_train.py: a checkpoint refuses a wrapper with others
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, tau=0.8, tau_mode="relative",
                          grace_steps=4, patience=2, ema=0.2, metric="grad_delta_l1")
    with caplog.at_level("WARNING", logger="grades_optim"):
        state = ckpt.load_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, restore_rng=False)
    assert state["step"] == previous and "torn or corrupted" in caplog.text
    out = run_to_end(tmp_path)
    assert out.splitlines()[0] == f"STEP {previous + 1}"
    assert_same(final(tmp_path), reference)


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    assert ckpt.load_checkpoint(tmp_path / "none", model=model, optimizer=opt) is None
    with pytest.raises(ValueError, match="Invalid keep"):
        ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, keep=0)
