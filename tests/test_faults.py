"""The bad-input and fault catalogue (docs/RELIABILITY.md mirrors this table).

Every case states the exact exception and message users see, and proves that nothing was
modified: model parameters, their requires_grad flags, the inner optimizer's state dict and, for
loads, the wrapper's own freeze set and step counter.
"""
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from grades_optim import GradESOptimizer
from tests.conftest import make_model
from tests.test_optimizer import inject


def snapshot(model, inner):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            copy.deepcopy(inner.state_dict()))


def assert_unchanged(before, model, inner):
    params, flags, sd = before
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.requires_grad == flags[n], n
    after = inner.state_dict()
    assert after["param_groups"] == sd["param_groups"]
    assert after["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for key, v in sd["state"][k].items():
            assert torch.equal(after["state"][k][key], v) if torch.is_tensor(v) else after["state"][k][key] == v


def build(model, **kw):
    return GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, **kw)


# (id, build kwargs or callable(model, inner), exception, message regex)
CONSTRUCTOR_CASES = [
    ("tau_zero", dict(tau=0.0), ValueError, r"Invalid tau: 0\.0; expected a finite number > 0"),
    ("tau_negative", dict(tau=-1e-3), ValueError, r"Invalid tau: -0\.001"),
    ("tau_nan", dict(tau=float("nan")), ValueError, r"Invalid tau: nan"),
    ("tau_inf", dict(tau=float("inf")), ValueError, r"Invalid tau: inf"),
    ("tau_string", dict(tau="0.1"), ValueError, r"Invalid tau: '0\.1'"),
    ("alpha_one", dict(tau=1.0, alpha=1.0, total_steps=10), ValueError, r"Invalid alpha: 1\.0; expected a fraction"),
    ("alpha_without_total_steps", dict(tau=1.0, alpha=0.3), ValueError, r"Invalid alpha: 0\.3 needs total_steps"),
    ("alpha_and_grace_steps", dict(tau=1.0, alpha=0.3, total_steps=10, grace_steps=2), ValueError,
     r"Invalid grace_steps: 2 together with alpha=0\.3; give one of them"),
    ("total_steps_zero", dict(tau=1.0, total_steps=0), ValueError, r"Invalid total_steps: 0"),
    ("check_interval_zero", dict(tau=1.0, check_interval=0), ValueError, r"Invalid check_interval: 0"),
    ("patience_zero", dict(tau=1.0, patience=0), ValueError, r"Invalid patience: 0"),
    ("ema_one", dict(tau=1.0, ema=1.0), ValueError, r"Invalid ema: 1\.0"),
    ("peak_gate_above_one", dict(tau=1.0, peak_gate=1.5), ValueError,
     r"Invalid peak_gate: 1\.5; expected a fraction in \[0, 1\] of the gradient's running peak"),
    ("peak_gate_negative", dict(tau=1.0, peak_gate=-0.1), ValueError, r"Invalid peak_gate: -0\.1"),
    ("peak_gate_string", dict(tau=1.0, peak_gate="0.8"), ValueError, r"Invalid peak_gate: '0\.8'"),
    ("peak_gate_bool", dict(tau=1.0, peak_gate=True), ValueError, r"Invalid peak_gate: True"),
    ("max_frozen_ratio_zero", dict(tau=1.0, max_frozen_ratio=0.0), ValueError, r"Invalid max_frozen_ratio: 0\.0"),
    ("unknown_metric", dict(tau=1.0, metric="grad_max"), ValueError,
     r"Invalid metric: 'grad_max'; expected one of 'grad_l1', 'grad_l2', 'grad_delta_l1', 'weight_delta_l1'"),
    ("unknown_reduction", dict(tau=1.0, reduction="median"), ValueError, r"Invalid reduction: 'median'"),
    ("unknown_freeze_mode", dict(tau=1.0, freeze_mode="hard"), ValueError, r"Invalid freeze_mode: 'hard'"),
    ("unknown_tau_mode", dict(tau=1.0, tau_mode="percent"), ValueError, r"Invalid tau_mode: 'percent'"),
    ("unknown_impl", dict(tau=1.0, impl="cuda"), ValueError, r"Invalid impl: 'cuda'"),
    ("matcher_bad_type", dict(tau=1.0, matcher=42), TypeError, r"matcher"),
    ("matcher_and_components", lambda m, inner: GradESOptimizer(
        inner, model=m, tau=1.0, matcher="q_proj", components={"q": m.model.layers[0].self_attn.q_proj}),
     ValueError, r"Invalid matcher: give either components= or matcher=, not both"),
    ("inner_not_an_optimizer", lambda m, inner: GradESOptimizer(m.parameters(), model=m, tau=1.0),
     TypeError, r"Invalid optimizer: expected a torch\.optim\.Optimizer instance, got generator"),
    ("inner_already_wrapped", lambda m, inner: GradESOptimizer(
        GradESOptimizer(torch.optim.SGD(m.parameters()), model=m, tau=1.0), model=m, tau=1.0),
     TypeError, r"Invalid optimizer: it is already a GradESOptimizer"),
    ("inner_lbfgs", lambda m, inner: GradESOptimizer(torch.optim.LBFGS(m.parameters()), model=m, tau=1.0),
     TypeError, r"LBFGS re-evaluates the closure"),
    ("no_model_no_components", lambda m, inner: GradESOptimizer(inner, tau=1.0), ValueError,
     r"GradESOptimizer needs model= .* or components="),
    ("model_not_a_module", lambda m, inner: GradESOptimizer(inner, model=m.state_dict(), tau=1.0),
     TypeError, r"Invalid model: expected a torch\.nn\.Module, got OrderedDict"),
    ("model_without_projections", lambda m, inner: GradESOptimizer(inner, model=nn.Linear(3, 3), tau=1.0),
     ValueError, r"(?s)Linear.*matcher=.*components="),
    ("components_not_in_optimizer", lambda m, inner: GradESOptimizer(
        torch.optim.AdamW(m.model.layers[0].parameters()), model=m, tau=1.0),
     ValueError, r"the optimizer does not hold 8 trainable parameter\(s\) of the components, e\.g\. model\.layers\.1"),
    ("param_in_two_components", lambda m, inner: GradESOptimizer(
        inner, tau=1.0, components={"a": m.model.layers[0].mlp.up_proj, "b": [m.model.layers[0].mlp.up_proj.weight]}),
     ValueError, r"in both 'a' and 'b'"),
    ("empty_components", lambda m, inner: GradESOptimizer(inner, tau=1.0, components={}), ValueError, r"components"),
    # values of the wrong type: the error names the type, not only the value
    ("tau_list", dict(tau=[0.3]), ValueError, r"^Invalid tau: \[0\.3\] \(list\); expected a finite number > 0$"),
    ("tau_bool", dict(tau=True), ValueError, r"^Invalid tau: True \(bool\); expected a finite number > 0$"),
    ("tau_1d_tensor", dict(tau=torch.tensor([0.3])), ValueError, r"^Invalid tau: tensor\(\[0\.3000\]\) \(Tensor\)"),
    ("patience_float", dict(tau=1.0, patience=3.0), ValueError,
     r"^Invalid patience: 3\.0; expected an int >= 1 \(1 = the paper's rule\)$"),
    ("patience_float_tensor", dict(tau=1.0, patience=torch.tensor(3.0)), ValueError, r"^Invalid patience: 3\.0; expected an int"),
    ("check_interval_str", dict(tau=1.0, check_interval="5"), ValueError,
     r"^Invalid check_interval: '5' \(str\); expected an int >= 1$"),
    ("ema_numpy_out_of_range", dict(tau=1.0, ema=np.float32(1.5)), ValueError,
     r"^Invalid ema: 1\.5; expected a smoothing factor in \[0, 1\) \(0 disables\)$"),
    ("total_steps_numpy_float", dict(tau=1.0, total_steps=np.float64(100.0)), ValueError,
     r"^Invalid total_steps: 100\.0; expected an int >= 1 or None$"),
]


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_faults_change_nothing(case):
    _, how, exc, message = case
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inject(model, 0)
    inner.step()
    before = snapshot(model, inner)
    with pytest.raises(exc, match=message):
        how(model, inner) if callable(how) else GradESOptimizer(inner, model=model, **how)
    assert_unchanged(before, model, inner)
    assert not any(k.startswith("grades_") for g in inner.param_groups for k in g)


# NumPy scalars and 0-d tensors (from configs and sweeps) are the numbers they hold
ACCEPTED_TYPES = [
    ("tau_numpy_float32", dict(tau=np.float32(0.25)), dict(tau=float(np.float32(0.25)))),
    ("tau_0d_tensor", dict(tau=torch.tensor(0.5, dtype=torch.float64)), dict(tau=0.5)),
    ("patience_numpy_int64", dict(tau=1.0, patience=np.int64(4)), dict(patience=4)),
    ("check_interval_0d_int_tensor", dict(tau=1.0, check_interval=torch.tensor(3)), dict(check_interval=3)),
    ("ema_numpy_float64", dict(tau=1.0, ema=np.float64(0.5)), dict(ema=0.5)),
    ("peak_gate_numpy_float32", dict(tau=1.0, peak_gate=np.float32(0.5)), dict(peak_gate=0.5)),
    ("alpha_total_steps_numpy", dict(tau=1.0, alpha=np.float32(0.5), total_steps=np.int32(10)),
     dict(alpha=0.5, total_steps=10, grace_steps=5)),
]


@pytest.mark.parametrize("case", ACCEPTED_TYPES, ids=[c[0] for c in ACCEPTED_TYPES])
def test_numpy_scalars_and_0d_tensors_are_accepted_as_plain_numbers(case):
    _, kw, want = case
    model = make_model()
    opt = build(model, **kw)
    for name, value in want.items():
        got = getattr(opt, name)
        assert got == value and type(got) is type(value), (name, got)


def test_assigning_tau_changes_the_rule_and_is_validated():
    """`opt.tau = x` was a silent no-op (the rule read a frozen config): it now takes effect at the
    next check, is validated like the constructor's, and a refused value changes nothing."""
    model = make_model()
    opt = build(model, tau=1e-12)
    inject(model, 0)
    opt.step()
    assert not any(c.frozen for c in opt.components)
    for bad, message in ((-1.0, r"^Invalid tau: -1\.0; expected a finite number > 0$"),
                         ("0.1", r"^Invalid tau: '0\.1' \(str\)"), (float("nan"), r"^Invalid tau: nan")):
        with pytest.raises(ValueError, match=message):
            opt.tau = bad
        assert opt.tau == 1e-12
    opt.tau = np.float32(1e9)  # a NumPy scalar is the number it holds
    assert opt.tau == float(np.float32(1e9)) and type(opt.tau) is float
    inject(model, 1)
    opt.step()
    assert all(c.frozen for c in opt.components) and opt.last_check[0].threshold == opt.tau
    assert opt.state_dict()["param_groups"]  # still a working optimizer


@pytest.mark.parametrize("name, value", [("patience", 5), ("ema", 0.5), ("tau_mode", "relative"),
                                         ("metric", "grad_l2"), ("reduction", "sum"), ("check_interval", 2)])
def test_rule_settings_other_than_tau_are_read_only(name, value):
    """Assigning them used to create an attribute nothing read. Now it is refused, naming the fix,
    and the setting is unchanged."""
    model = make_model()
    opt = build(model, tau=1.0, patience=2, ema=0.1, check_interval=1)
    before = getattr(opt, name)
    with pytest.raises(AttributeError, match=rf"^GradESOptimizer\.{name} is fixed at construction .*"
                                             rf"build a new GradESOptimizer with {name}={value!r}\. Only tau"):
        setattr(opt, name, value)
    assert getattr(opt, name) == before


def test_relative_tau_above_one_warns_at_construction_and_when_set():
    model = make_model()
    with pytest.warns(UserWarning, match=r"^tau=30 with tau_mode='relative' is more than the grace-period reading"):
        opt = build(model, tau=30, tau_mode="relative")
    with pytest.warns(UserWarning, match=r"^tau=2\.0 with tau_mode='relative'"):
        opt.tau = 2.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.tau = 0.5  # a fraction: no warning
        build(make_model(), tau=30)  # absolute: the metric's units, no warning


def trained(seed=0, **kw):
    model = make_model(seed=seed, **kw)
    opt = build(model, tau=0.05)
    for s in range(3):
        inject(model, s, {"self_attn": 1e-3})
        opt.step()
    return model, opt


def file_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


LOAD_CASES = [
    ("another_model_shape", lambda: trained(d=12)[1].state_dict(), ValueError,
     r"state_dict is from a different parameter layout: param_groups\[0\]\['grades_numel'\]"),
    ("another_depth", lambda: trained(n_layers=1)[1].state_dict(), ValueError,
     r"state_dict param_groups\[0\] has 14 params, this optimizer's has 24: a different parameter layout"),
    ("another_parameter_order", lambda: _reordered(), ValueError,
     r"state_dict is from a different parameter layout: param_groups\[0\]\['grades_cid'\]"),
    ("another_group_count", lambda: _two_groups(), ValueError, r"state_dict has 2 param groups, this optimizer has 1"),
    ("another_optimizer_class", lambda: _sgd_state(), ValueError,
     r"state_dict comes from a different optimizer class \(its param_groups lack 'betas'"),
    ("not_a_state_dict", lambda: {"model": 1}, ValueError, r"Invalid state_dict: expected an optimizer state dict"),
    ("not_a_dict", lambda: [1, 2], ValueError, r"Invalid state_dict: .* got list"),
    ("another_metric", lambda: _saved_with(metric="grad_l2"), ValueError,
     r"state_dict was saved with other GradES rule settings \(metric='grad_l2' there, 'grad_l1' here\)"),
    ("another_ema_and_tau_mode", lambda: _saved_with(ema=0.5, tau_mode="relative", tau=0.5), ValueError,
     r"other GradES rule settings \(tau_mode='relative' there, 'absolute' here; ema=0\.5 there, 0\.0 here\)"),
    ("another_peak_gate", lambda: _saved_with(peak_gate=0.8), ValueError, r"peak_gate=0\.8 there, 0\.0 here"),
    ("newer_state_format", lambda: _edited_state(lambda st: st + [1.0, 2.0]), ValueError,
     r"param_groups\[0\]\['grades_state'\]\[3\] is .*\(10 entries\): not a component state this grades_optim "
     r"can read \(at most 8 numbers, the first a step or None; saved by another version\?\)"),
    ("state_not_numbers", lambda: _edited_state(lambda st: ["3"] + st[1:]), ValueError,
     r"\['grades_state'\]\[3\] is \['3', 1, .*: not a component state"),
]


def _saved_with(**rule):
    model = make_model()
    opt = build(model, **{"tau": 0.05, **rule})
    inject(model, 0)
    opt.step()
    return opt.state_dict()


def _edited_state(edit):
    sd = trained()[1].state_dict()
    for group in sd["param_groups"]:
        group["grades_state"] = [None if st is None else edit(list(st)) for st in group["grades_state"]]
    return sd


def _reordered():
    model = make_model()
    params = list(model.parameters())
    opt = GradESOptimizer(torch.optim.AdamW(params[::-1], lr=1e-2), model=model, tau=0.05)
    return opt.state_dict()


def _two_groups():
    model = make_model()
    params = list(model.parameters())
    inner = torch.optim.AdamW([{"params": params[:10]}, {"params": params[10:]}], lr=1e-2)
    return GradESOptimizer(inner, model=model, tau=0.05).state_dict()


def _sgd_state():
    model = make_model()
    opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), model=model, tau=0.05)
    inject(model, 0)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_faults_change_nothing(case):
    _, make_sd, exc, message = case
    model, opt = trained()
    before = snapshot(model, opt.optimizer)
    frozen, step = [c.frozen_at_step for c in opt.components], opt.step_count
    with pytest.raises(exc, match=message):
        opt.load_state_dict(make_sd())
    assert_unchanged(before, model, opt.optimizer)
    assert [c.frozen_at_step for c in opt.components] == frozen and opt.step_count == step


def test_truncated_checkpoint_file_fails_before_anything_is_loaded(tmp_path):
    model, opt = trained()
    path = tmp_path / "optimizer.pt"
    data = file_bytes(opt.state_dict())
    path.write_bytes(data[: len(data) // 2])
    before = snapshot(model, opt.optimizer)
    # torch's zip reader reports a cut file as OSError(EINVAL) or RuntimeError depending on where
    with pytest.raises((RuntimeError, OSError)):
        opt.load_state_dict(torch.load(path, weights_only=True))
    assert_unchanged(before, model, opt.optimizer)


def test_corrupted_checkpoint_bytes_fail_cleanly(tmp_path):
    model, opt = trained()
    path = tmp_path / "optimizer.pt"
    path.write_bytes(b"not a checkpoint" * 8)
    before = snapshot(model, opt.optimizer)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        opt.load_state_dict(torch.load(path, weights_only=True))
    assert_unchanged(before, model, opt.optimizer)


def test_grades_state_into_plain_optimizer_and_back_keeps_the_freeze_set():
    model, opt = trained()
    sd = torch.load(io.BytesIO(file_bytes(opt.state_dict())), weights_only=True)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain.load_state_dict(sd)  # the grades_* keys ride along in the groups
    rewrapped = GradESOptimizer(plain, model=model, tau=0.05)
    rewrapped.load_state_dict(plain.state_dict())
    assert [c.frozen_at_step for c in rewrapped.components] == [c.frozen_at_step for c in opt.components]
    assert rewrapped.step_count == 3 and any(c.frozen for c in rewrapped.components)


# -- numerics ---------------------------------------------------------------------------------
def test_zero_empty_and_missing_gradients():
    model = make_model()
    opt = build(model, tau=1e-6, grace_steps=2)  # step 1 is the grace period
    layer0, layer1 = model.model.layers
    for s in range(3):
        inject(model, s)
        for p in layer0.self_attn.q_proj.parameters():
            if p.grad is not None:
                p.grad.zero_()  # exactly zero: no learning signal, reads 0.0 and freezes after grace
        for p in layer1.parameters():
            p.grad = None  # never receives a gradient: never measured, never frozen
        opt.step()
    q0 = next(c for c in opt.components if c.name == "model.layers.0.self_attn.q_proj")
    assert q0.frozen_at_step == 2
    assert not any(c.frozen for c in opt.components if ".layers.1." in c.name)
    assert not opt.should_stop  # a never-measured component keeps training from stopping
    empty = nn.Parameter(torch.zeros(0, 4))
    opt_e = GradESOptimizer(torch.optim.SGD([empty], lr=0.1), tau=1.0, components={"empty_proj": empty})
    empty.grad = torch.zeros_like(empty)
    opt_e.step()
    assert opt_e.last_check[0].metric != opt_e.last_check[0].metric  # NaN: an empty matrix is not measured
    assert not opt_e.components[0].frozen


def test_bf16_parameters_measure_in_fp32_and_freeze_bit_identically():
    model = make_model().to(torch.bfloat16)
    opt = build(model, tau=0.05)
    inject(model, 0, {"self_attn": 1e-3})
    ref = {n: p.grad.float().abs().sum().item() for n, p in model.named_parameters()}
    opt.step()
    q = opt.components[0]
    expected = sum(ref[n] for n in q.param_names) / q.numel
    assert q.frozen and opt.history[0].metric == pytest.approx(expected, rel=1e-3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" in n}
    for s in range(1, 4):
        inject(model, s)
        opt.step()
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_checkpoints_written_before_the_rule_settings_were_kept_still_load():
    model, opt = trained()
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["grades_rule"]
        group["grades_state"] = [None if st is None else list(st)[:6] for st in group["grades_state"]]
    model2, opt2 = trained(seed=1)
    opt2.load_state_dict(sd)
    assert [c.frozen_at_step for c in opt2.components] == [c.frozen_at_step for c in opt.components]
    assert opt2.step_count == opt.step_count == 3 and any(c.frozen for c in opt2.components)


def test_a_step_that_raises_is_not_counted():
    model, opt = trained()
    real = opt.optimizer.step
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated)")

    opt.optimizer.step = out_of_memory
    inject(model, 3)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    assert calls and opt.step_count == 3 and opt.param_groups[0]["grades_step"] == 3
    opt.optimizer.step = real
    opt.step()  # the caller retries (e.g. after freeing memory): that one is step 4
    assert opt.step_count == 4 and opt.state_dict()["param_groups"][0]["grades_step"] == 4


def test_an_inner_carrying_grades_state_is_taken_over_with_a_warning(caplog):
    model, opt = trained()
    sd = opt.state_dict()
    model2 = make_model()
    inner = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    inner.load_state_dict(sd)  # a GradES checkpoint loaded into the plain inner optimizer
    with caplog.at_level("WARNING", logger="grades_optim"):
        opt2 = GradESOptimizer(inner, model=model2, tau=0.05)
    assert opt2.step_count == 3 and [c.frozen_at_step for c in opt2.components] == \
        [c.frozen_at_step for c in opt.components]
    assert "continuing that run at step 3" in caplog.text
    model3 = make_model()
    inner3 = torch.optim.AdamW(model3.parameters(), lr=1e-2)
    inner3.load_state_dict(sd)
    before = copy.deepcopy(inner3.state_dict())
    with pytest.raises(ValueError, match=r"the inner optimizer's param_groups was saved with other GradES rule "
                                         r"settings \(metric='grad_l1' there, 'grad_l2' here\)"):
        GradESOptimizer(inner3, model=model3, tau=0.05, metric="grad_l2")
    assert inner3.state_dict()["param_groups"] == before["param_groups"]


def test_parameters_removed_from_a_tracked_group_are_refused():
    model, opt = trained()
    opt.param_groups[0]["params"].pop(0)  # pruning: every later position now holds another tensor
    with pytest.raises(ValueError, match=r"param_groups\[0\] now holds 23 params \(it held 24 when GradES was "
                                         r"built\): the tracked components address their parameters by position"):
        opt.step()
    extra = nn.Parameter(torch.zeros(3))
    model2, opt2 = trained()
    opt2.add_param_group({"params": [extra]})  # a new group is untracked: fine
    extra.grad = torch.ones(3)
    inject(model2, 3)
    opt2.step()
    assert opt2.step_count == 4
