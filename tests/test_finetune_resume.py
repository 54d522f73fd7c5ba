"""``grades-optim finetune --resume``: SIGKILL the CLI at random steps and mid checkpoint write,
resume each time, and get the report (every non-timing field), the GradES freeze timeline and the
final parameters of an uninterrupted run, bit for bit (CPU, 1 thread).

The CLI runs through tests/finetune_crash_driver.py (test-only instrumentation, monkeypatched in);
every subprocess has a hard time limit and its own process group, killed on the way out.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402
from finetune_fixtures import make_rows, make_tiny_model, write_csv  # noqa: E402

import grades_optim.checkpoint as ckpt  # noqa: E402
from grades_optim.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
LIMIT_S = 60  # per subprocess
EVERY = 4
ARGS = ["--text-column", "review", "--label-column", "sentiment", "--threads", "1", "--quiet",
        "--max-steps", "60", "--batch-size", "16", "--max-length", "16", "--lr", "2e-3", "--es-every", "5",
        "--es-patience", "2", "--probe-every", "10", "--alpha", "0.25", "--grades-patience", "2",
        "--checkpoint-every", str(EVERY)]
TIMING = ("wall_seconds", "val_seconds")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_model(root / "model", dropout=0.1)  # dropout: the RNG must be restored too
    data = write_csv(root / "reviews.csv", make_rows(320))
    return root, ["finetune", "--model", str(model), "--dataset", str(data), *ARGS]


class Run:
    """One driver subprocess; stdout is read line by line (markers), stderr goes to a file."""

    def __init__(self, base, final_dir, out, *cli_extra, delay=0.02, pause_write=""):
        self.log = Path(str(final_dir) + f".log-{random.random():.9f}")
        self.err = open(self.log, "w")
        cmd = [sys.executable, "-m", "tests.finetune_crash_driver", str(final_dir), "--step-delay", str(delay),
               "--pause-write", pause_write, "--", *base, "--out", str(out), *cli_extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     start_new_session=True)  # its own group: killable as a whole
        self.lines: list[str] = []
        self.watchdog = threading.Timer(LIMIT_S, self._kill)  # hard limit, even while blocked reading
        self.watchdog.start()

    def _kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_at(self, marker):
        try:
            for line in self.proc.stdout:
                self.lines.append(line.strip())
                if line.strip() == marker:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    break
            self.proc.wait(timeout=LIMIT_S)
        finally:
            self.close()
        assert self.proc.returncode == -signal.SIGKILL, \
            f"not killed at {marker!r}: {self.lines[-3:]}\n{self.log.read_text()[-3000:]}"
        return self.lines

    def finish(self):
        try:
            out, _ = self.proc.communicate(timeout=LIMIT_S)
            self.lines += out.splitlines()
        except subprocess.TimeoutExpired:
            pytest.fail(f"run exceeded {LIMIT_S}s:\n{self.log.read_text()[-3000:]}")
        finally:
            self.close()
        assert self.proc.returncode == 0, self.log.read_text()[-5000:]
        return self.lines

    def close(self):
        self.watchdog.cancel()
        self._kill()  # the whole group: nothing may outlive the test
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.err.close()


def first_step(lines):
    return next(ln for ln in lines if ln.startswith("STEP "))


def comparable(out: Path) -> tuple[list, str]:
    methods = json.loads((out / "results.json").read_text())["methods"]
    for m in methods:
        for k in TIMING:
            m.pop(k)
        m["curve"] = [point[1:] for point in m["curve"]]  # [wall_s, step, acc, loss]: drop the clock
    return methods, (out / "history.csv").read_text()


def test_sigkill_at_random_steps_and_mid_write_resumes_bit_identically(tiny, tmp_path):
    root, base = tiny
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    why = f"(kill-point seed {seed})"
    ref = Run(base, tmp_path / "ref-final", tmp_path / "ref", delay=0.0)  # alongside: 2 cores
    out, final = tmp_path / "run" / "report", tmp_path / "run-final"
    work = tmp_path / "run" / ".report.work"
    kills = []
    try:
        k1, k2 = rng.randint(EVERY + 1, 28), rng.randint(33, 58)
        lines = Run(base, final, out, "--resume").kill_at(f"STEP full {k1}")
        assert first_step(lines) == "STEP full 1", why
        lines = Run(base, final, out, "--resume").kill_at(f"STEP full {k2}")
        assert first_step(lines) == f"STEP full {(k1 - 1) // EVERY * EVERY + 1}", why
        kills += [("full", k1), ("full", k2)]
        ref.finish()
    finally:
        ref.close()
    ref_methods, ref_history = comparable(tmp_path / "ref")
    steps = {m["method"]: m["steps"] for m in ref_methods}
    assert steps["full"] == 60 and 24 <= steps["grades"] < 60, f"the reference must freeze mid-run: {steps}"
    grades_frozen = [c["frozen_at_step"] for c in ref_methods[2]["components"]]
    assert all(s is not None for s in grades_frozen)

    k3 = rng.randint(2, steps["classic-es"] - 1)
    Run(base, final, out, "--resume").kill_at(f"STEP classic-es {k3}")
    k4 = rng.randint(2, 11)
    lines = Run(base, final, out, "--resume").kill_at(f"STEP grades {k4}")
    assert "SAVED full/ckpt-000000004.pt" not in lines, "full is finished: not trained again"
    c = rng.choice([w for w in (16, 20) if w + 2 * EVERY + 1 <= steps["grades"] - 1])
    Run(base, final, out, "--resume", pause_write=f"grades/ckpt-{c:09d}.pt").kill_at("WRITING")
    assert not (work / "grades" / f"ckpt-{c:09d}.pt").exists(), "killed mid-write: no file under the final name"
    assert list((work / "grades").glob(f".ckpt-{c:09d}.pt.tmp-*")), "the torn temporary file is left behind"
    k6 = rng.randint(c + 2 * EVERY + 1, steps["grades"] - 1)
    lines = Run(base, final, out, "--resume").kill_at(f"STEP grades {k6}")
    assert first_step(lines) == f"STEP grades {c - EVERY + 1}", why
    kills += [("classic-es", k3), ("grades", k4), ("grades", f"write {c}"), ("grades", k6)]

    # a torn newest checkpoint (a disk that lost the tail): the previous one is used
    newest, previous = ckpt.list_checkpoints(work / "grades")[:2]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) * 2 // 3])
    run = Run(base, final, out, "--resume")
    lines = run.finish()
    log = run.log.read_text()
    assert "torn or corrupted" in log and f"resumed from the checkpoint of step {int(previous.name[5:14])}" in log
    assert first_step(lines) == f"STEP grades {int(previous.name[5:14]) + 1}", why

    assert len(kills) >= 5
    methods, history = comparable(out)
    assert methods == ref_methods, why
    assert history == ref_history, why
    for m in ("full", "classic-es", "grades"):
        a = torch.load(final / f"{m}.pt", weights_only=True)
        b = torch.load(tmp_path / "ref-final" / f"{m}.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{m} params differ {why}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report"], "work folder removed after the report"


# -- the rules of the work folder (in-process, tiny and fast) -----------------------------------

def interrupted(base, out, monkeypatch, *extra):
    """Leave a work folder behind: the second method raises, as a crash in it would."""
    from grades_optim.finetune import runner

    real, calls = runner.train_method, []

    def boom(method, *args, **kwargs):
        calls.append(method)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(runner, "train_method", boom)
    with pytest.raises(RuntimeError):
        main([*base, "--out", str(out), "--max-steps", "8", *extra])
    monkeypatch.setattr(runner, "train_method", real)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_work_folder_rules(tiny, tmp_path, monkeypatch, capsys, caplog):
    _, base = tiny
    out = tmp_path / "rep"
    work = tmp_path / ".rep.work"
    interrupted(base, out, monkeypatch)
    before = snapshot(tmp_path)
    assert (work / "config.json").is_file() and (work / "full" / "result.json").is_file()

    # another configuration is refused, and nothing is modified
    assert main([*base, "--out", str(out), "--max-steps", "8", "--lr", "1e-3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "differs in: lr" in err and err.startswith("grades-optim finetune: error:")
    assert snapshot(tmp_path) == before
    # an interrupted run is never mixed with a new one: --resume or --overwrite
    assert main([*base, "--out", str(out), "--max-steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "interrupted run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before
    # --resume --overwrite does not discard a mismatching run either
    assert main([*base, "--out", str(out), "--max-steps", "9", "--resume", "--overwrite"]) == 2
    assert snapshot(tmp_path) == before
    # a bad value is refused before anything happens
    assert main([*base, "--out", str(out), "--checkpoint-every", "-1"]) == 2
    assert "Invalid checkpoint_every" in capsys.readouterr().err
    # settings that cannot change a result may differ (threads, checkpoint cadence, quiet)
    with caplog.at_level("INFO", logger="grades_optim.finetune"):
        assert main([*base, "--out", str(out), "--max-steps", "8", "--resume", "--checkpoint-every", "3"]) == 0
    assert "continuing the interrupted run" in caplog.text and "finished: full" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_overwrite_discards_and_resume_without_work_folder_starts_fresh(tiny, tmp_path, monkeypatch, caplog):
    _, base = tiny
    out = tmp_path / "rep"
    interrupted(base, out, monkeypatch)
    with caplog.at_level("INFO", logger="grades_optim.finetune"):
        assert main([*base, "--out", str(out), "--max-steps", "6", "--overwrite", "--checkpoint-every", "0"]) == 0
    assert "discarding the interrupted run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    caplog.clear()
    with caplog.at_level("INFO", logger="grades_optim.finetune"):
        assert main([*base, "--out", str(tmp_path / "new"), "--max-steps", "6", "--resume"]) == 0
    assert "no interrupted run" in caplog.text and "starting fresh" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "rep"]


def test_unreadable_work_folder_is_refused(tiny, tmp_path, monkeypatch, capsys):
    _, base = tiny
    out = tmp_path / "rep"
    interrupted(base, out, monkeypatch)
    (tmp_path / ".rep.work" / "config.json").write_text("{torn")
    before = snapshot(tmp_path)
    assert main([*base, "--out", str(out), "--max-steps", "8", "--resume"]) == 2
    assert "not a usable work folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
