"""``torchrun --nproc_per_node=2 -m grades_optim finetune`` on CPU (gloo): one report from rank 0,
GradES freezes under DDP, every rank ends every method with identical parameters and freeze steps,
and the per-step global batch is the single-process one.

Each launch has a hard time limit and runs in its own session, whose process group (torchrun and
both ranks) is killed on the way out: no leftover processes.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from finetune_fixtures import make_rows, make_tiny_model, write_csv  # noqa: E402

from grades_optim.cli import main  # noqa: E402
from tests.conftest import run_isolated  # noqa: E402

LIMIT_S = 90
ARGS = ["--text-column", "review", "--label-column", "sentiment", "--quiet", "--max-steps", "60",
        "--batch-size", "16", "--max-length", "16", "--lr", "2e-3", "--es-every", "5", "--es-patience", "2",
        "--probe-every", "10", "--alpha", "0.25", "--grades-patience", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    model = make_tiny_model(root / "model")
    data = write_csv(root / "reviews.csv", make_rows(320))
    return ["finetune", "--model", str(model), "--dataset", str(data), *ARGS]


def torchrun(args, out, nproc=2, kill_when=None, driver=("grades_optim",)) -> tuple[int, str]:
    return run_isolated(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                         "-m", *driver, *args, "--out", str(out)], LIMIT_S, "torchrun", kill_when=kill_when)


def _outcome(payload) -> dict:
    """Everything a run decides (not its wall times): equal iff training was bit-identical."""
    return {m["method"]: (m["steps"], m["stop_reason"], m["test_accuracy"], m["test_loss"], m["train_loss"],
                          [c["frozen_at_step"] for c in m.get("components") or []])
            for m in payload["methods"]}


def test_two_ranks_write_one_report_and_agree(tiny, tmp_path):
    out = tmp_path / "report"
    rc, log = torchrun(tiny, out)
    assert rc == 0, log[-5000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"], "one report, no work or temporary folders"
    payload = json.loads((out / "results.json").read_text())
    assert payload["context"]["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "DDP",
                                                 "ranks_agree": {"full": True, "classic-es": True, "grades": True}}
    methods = {m["method"]: m for m in payload["methods"]}
    grades = methods["grades"]
    assert grades["frozen_ratio"] > 0 and grades["summary"]["freeze_mode"] == "requires_grad"
    assert any(c["frozen_at_step"] is not None for c in grades["components"])
    assert log.count("| method |") == 1, "rank 0 alone prints the table"
    for m in methods:
        assert f"{m}: all 2 ranks hold identical parameters, freeze steps and scores" in log
    assert "[rank 0] INFO" in log and "[rank 1] INFO" not in log, "the other ranks log warnings only"

    # the global batch is the single-process one: same losses up to float reduction order
    single = tmp_path / "single"
    assert main([*tiny, "--out", str(single), "--methods", "full", "--threads", "1"]) == 0
    ref = json.loads((single / "results.json").read_text())["methods"][0]
    assert ref["steps"] == methods["full"]["steps"] == 60
    assert methods["full"]["train_loss"] == pytest.approx(ref["train_loss"], abs=2e-4)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "15"], "--batch-size 15 is not divisible by the 2 torchrun processes"),
])
def test_bad_options_fail_cleanly_on_every_rank(tiny, tmp_path, extra, message):
    rc, log = torchrun([*tiny, *extra], tmp_path / "report")
    assert rc != 0
    assert log.count(f"grades-optim finetune: error: {message}") == 2, log[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_killed_run_resumes_bit_identically(tiny, tmp_path):
    """SIGKILL the whole launch once GradES (the last method) has its step-10 checkpoint; ``--resume`` under
    torchrun takes full and classic-es from the work folder, continues GradES from step 10 with
    each rank's own RNG stream, and ends exactly where an uninterrupted launch ends."""
    # dropout on: each rank consumes its own RNG stream (its shard pads to its own length)
    model = make_tiny_model(tmp_path / "dropout-model", dropout=0.1)
    tiny = [str(model) if a == tiny[tiny.index("--model") + 1] else a for a in tiny]
    ref_out = tmp_path / "reference"
    rc, log = torchrun(tiny, ref_out)
    assert rc == 0, log[-5000:]
    reference = json.loads((ref_out / "results.json").read_text())

    out = tmp_path / "report"
    ckpt = tmp_path / ".report.work" / "grades" / "ckpt-000000010.pt"
    args = [*tiny, "--checkpoint-every", "10"]
    # the test driver sleeps 0.1 s per step, so the kill lands a step or two after that checkpoint,
    # long before GradES stops (~step 38)
    slow = ("tests.finetune_crash_driver", str(tmp_path / "final"), "--step-delay", "0.1", "--")
    rc, log = torchrun(args, out, kill_when=ckpt.is_file, driver=slow)
    assert rc != 0 and not out.exists(), log[-3000:]
    assert (tmp_path / ".report.work" / "classic-es" / "result.json").is_file()

    rc, log = torchrun([*args, "--resume"], out, nproc=1)  # another rank count is refused
    assert rc != 0 and "differs in: world_size" in log, log[-3000:]

    rc, log = torchrun([*args, "--resume"], out)
    assert rc == 0, log[-5000:]
    assert "grades: resumed from the checkpoint of step" in log
    assert "method full: finished before the interruption" in log
    resumed = json.loads((out / "results.json").read_text())
    # (full and classic-es were checked by the killed launch; this one trained grades alone)
    assert resumed["context"]["distributed"]["ranks_agree"] == {"grades": True}
    assert _outcome(resumed) == _outcome(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dropout-model", "final", "reference", "report"], \
        "work folder removed"
