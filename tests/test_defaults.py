"""One source of defaults (grades_optim.defaults) and the guards that say when decisions look uninformative."""
import logging

import pytest
import torch

from grades_optim import GradESOptimizer, defaults
from tests.conftest import batch, make_model


def _train(opt, model, steps):
    for s in range(steps):
        model.loss(batch(opt.step_count + s * 0)).backward()
        opt.step()
        opt.zero_grad()


def test_no_tau_takes_the_grades_preset():
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, total_steps=40)
    g = defaults.GRADES
    assert (opt.metric, opt.tau, opt.alpha, opt.reduction) == (g["metric"], g["tau"], g["alpha"], g["reduction"])
    assert (opt._cfg.tau_mode, opt._cfg.patience, opt._cfg.ema) == (g["tau_mode"], g["patience"], g["ema"])
    assert opt.peak_gate == g["peak_gate"]
    assert opt.grace_steps == int(g["alpha"] * 40)


def test_no_tau_without_adam_moments_takes_the_weight_delta_fallback():
    model = make_model()
    opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), model=model, total_steps=40)
    assert (opt.metric, opt.tau, opt._cfg.tau_mode) == tuple(defaults.NO_MOMENTS[k] for k in ("metric", "tau", "tau_mode"))


def test_a_given_tau_takes_the_paper_preset():
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, tau=1e-3)
    p = defaults.PAPER
    assert (opt.metric, opt.alpha, opt._cfg.patience, opt._cfg.ema, opt._cfg.tau_mode, opt.peak_gate) == (
        p["metric"], p["alpha"], p["patience"], p["ema"], p["tau_mode"], 0.0)


def test_the_default_tau_is_refused_for_another_metric():
    model = make_model()
    with pytest.raises(ValueError, match="tau"):
        GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, metric="grad_l1")
    with pytest.raises(ValueError, match="metric"):  # an unknown metric is named as such
        GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, metric="foo")


def test_the_default_grace_period_waits_for_total_steps(caplog):
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model)
    assert opt.summary()["grace_pending_total_steps"] and opt.grace_steps == 0
    opt.set_total_steps(50)
    assert not opt.summary()["grace_pending_total_steps"]
    assert opt.grace_steps == int(defaults.GRADES["alpha"] * 50)
    m2 = make_model()
    other = GradESOptimizer(torch.optim.AdamW(m2.parameters()), model=m2)
    with caplog.at_level(logging.WARNING, logger="grades_optim"):
        _train(other, m2, 1)  # the first step says the grace period was dropped
    assert "waits for total_steps" in caplog.text


def test_burst_guard_fires_when_most_freeze_right_after_grace(caplog):
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, tau=1e9, grace_steps=3,
                          total_steps=20)
    with caplog.at_level(logging.WARNING, logger="grades_optim"):
        _train(opt, model, 5)
    assert opt.summary()["guard_burst_after_grace"] and "too loose" in caplog.text
    assert not opt.summary()["guard_nothing_frozen"]


def test_nothing_frozen_guard_fires_at_its_fraction_of_total_steps(caplog):
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, tau=1e-30, total_steps=20)
    at = int(20 * 0.75)
    with caplog.at_level(logging.WARNING, logger="grades_optim"):
        _train(opt, model, at - 1)
        assert not opt.summary()["guard_nothing_frozen"] and "nothing has frozen" not in caplog.text
        _train(opt, model, 1)
    assert opt.summary()["guard_nothing_frozen"] and "nothing has frozen" in caplog.text
    assert not opt.summary()["guard_burst_after_grace"]
