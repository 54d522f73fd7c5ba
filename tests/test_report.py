"""Report helpers: table formatting, history round trip, plots from synthetic data (no training)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from grades_optim import report  # noqa: E402

METHODS = [
    {"method": "full", "test_accuracy": 0.80, "wall_seconds": 100.0, "steps": 300, "planned_steps": 300,
     "frozen_ratio": 0.0, "stop_reason": "schedule finished", "curve": [[10.0, 25, 0.7, 0.6], [100.0, 300, 0.8, 0.5]]},
    {"method": "classic-es", "test_accuracy": 0.79, "wall_seconds": 80.0, "steps": 200, "planned_steps": 300,
     "frozen_ratio": 0.0, "stop_reason": "patience", "curve": []},
    {"method": "grades", "test_accuracy": 0.801, "wall_seconds": 40.0, "steps": 150, "planned_steps": 300,
     "frozen_ratio": 1.0, "stop_reason": "all frozen",
     "components": [{"name": "q", "kind": "attention", "frozen_at_step": 10},
                    {"name": "k", "kind": "attention", "frozen_at_step": 30},
                    {"name": "up", "kind": "mlp", "frozen_at_step": None}]},
]


def _history(thresholds):
    rows = []
    for step in range(1, 21):
        for c, (name, kind) in enumerate([("l0.q", "attention"), ("l0.up", "mlp")]):
            rows.append({"method": "grades", "step": step, "component": name, "kind": kind,
                         "metric": 1.0 / step, "value": 1.0 / step, "threshold": thresholds[c],
                         "frozen": step >= 15 + c})
    return rows


def test_table_has_speedups_and_deltas():
    table = report.format_table(METHODS)
    assert "| grades | 80.1% | +0.1 | 40.0 | 150/300 | 100% | 2.50× | 2.00× | all frozen |" in table
    assert "| full | 80.0% | +0.0 |" in table
    assert "| full |" in report.format_table(METHODS[:1])


@pytest.mark.parametrize("thresholds", [(0.1, 0.1), (0.1, 0.2)], ids=["absolute", "relative"])
def test_history_round_trip_and_plots(tmp_path, thresholds):
    history = _history(thresholds)
    report.write_results(tmp_path / "results.json", {"context": {"line": "ctx"}, "methods": METHODS})
    report.write_history(tmp_path / "history.csv", history)
    payload, back = report.read_report(tmp_path)
    assert payload["methods"][2]["method"] == "grades" and len(back) == len(history)
    assert back[0]["step"] == 1 and back[-1]["frozen"] is True and back[0]["frozen"] is False
    assert report.plot_components(back, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 5000
    assert report.plot_accuracy(payload["methods"], tmp_path / "a.png")
    assert "ctx" in report.render(tmp_path)
    assert (tmp_path / "components.png").exists() and (tmp_path / "accuracy.png").exists()


def test_freeze_order_line():
    line = report.freeze_order(METHODS)
    assert line == ("grades freeze order: attention 2/2 frozen, step mean 20 / median 30 / first 10; "
                    "mlp 0/1 frozen")


def test_no_history_means_no_component_plot(tmp_path):
    assert report.plot_components([], tmp_path / "c.png") is False
    assert not (tmp_path / "c.png").exists()


def test_read_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report.read_report(tmp_path)
    (tmp_path / "results.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.read_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="no 'methods' list"):
        report.read_report(tmp_path)
