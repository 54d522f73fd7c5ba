"""Host cost per step (issue 11): the cached layout, lazy group keys, live-only rule, bounded history.

Structure, not timings (those live in benchmarks/bench_host_overhead.py): these tests check that
steady steps rebuild nothing, that what is cached is rebuilt when groups or the freeze set change,
that frozen components drop out of the per-step work, and that the bounded history keeps the
timeline users need complete.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from grades_optim import GradESOptimizer, optimizer as optimizer_mod
from grades_optim.rule import ComponentState, RuleConfig, decide


def _params(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(3, 2, generator=g)) for _ in range(n)]


def _wrap(params, inner=None, **kw):
    kw = dict(dict(tau=1e-9, tau_mode="absolute", metric="grad_l1", grace_steps=0, patience=1, ema=0.0,
                   impl="torch"), **kw)
    inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0) if inner is None else inner
    return GradESOptimizer(inner, components={f"layers.{i}.q_proj": p for i, p in enumerate(params)}, **kw)


def _grads(params, zero=(), none=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        if i in none:
            p.grad = None
        elif i in zero:
            p.grad = torch.zeros_like(p)
        else:
            p.grad = torch.randn(p.shape, generator=g)


def test_steady_steps_rebuild_nothing_and_freezes_rebuild_once():
    params = _params(6)
    opt = _wrap(params)
    _grads(params)
    opt.step()
    layout = opt._layout()
    for s in range(3):
        _grads(params, seed=s)
        opt.step()
        assert opt._layout() is layout  # nothing changed: the same cached object
    _grads(params, zero={1, 4})
    opt.step()  # components 1 and 4 read 0 and freeze
    rebuilt = opt._layout()
    assert rebuilt is not layout
    assert rebuilt.live_cids == [0, 2, 3, 5] and rebuilt.frozen == [params[1], params[4]]
    # the masked inner step hides exactly the frozen params, and restores the group afterwards
    assert rebuilt.unfrozen[0] == [params[0], params[2], params[3], params[5]]
    assert opt.param_groups[0]["params"] == params


def test_group_changes_rebuild_the_layout():
    params = _params(3)
    opt = _wrap(params)
    layout = opt._layout()
    extra = nn.Parameter(torch.zeros(2))
    opt.optimizer.add_param_group({"params": [extra]})  # behind the wrapper's back
    assert opt._layout() is not layout and opt._layout().cid == [[0, 1, 2], [-1]]
    layout = opt._layout()
    opt.optimizer.load_state_dict(opt.optimizer.state_dict())  # new group dicts
    assert opt._layout() is not layout
    layout = opt._layout()
    group = opt.param_groups[0]
    group["params"] = list(group["params"])  # accelerate's parameter swap: a new list
    assert opt._layout() is not layout


def test_steps_do_not_rewrite_group_keys_but_state_dict_is_current(monkeypatch):
    params = _params(4)
    opt = _wrap(params, check_interval=1)
    calls = []
    real = GradESOptimizer._write_groups
    monkeypatch.setattr(GradESOptimizer, "_write_groups", lambda self: (calls.append(1), real(self)))
    for s in range(3):
        _grads(params, seed=s)
        opt.step()
    assert calls == []  # checks without a freeze leave the rule readings to state_dict()
    sd = opt.state_dict()
    assert calls == [1]
    assert sd["param_groups"][0]["grades_state"] == [list(s) for s in opt._states]
    assert sd["param_groups"][0]["grades_step"] == 3


def test_a_freeze_is_in_the_inner_groups_at_once():
    """specs_for() and re-wrapping read the freeze set from the inner groups without a state_dict()."""
    params = _params(4)
    opt = _wrap(params)
    _grads(params, zero={2})
    opt.step()
    states = opt.param_groups[0]["grades_state"]
    assert ComponentState(*states[2]).frozen_at == 1
    assert all(ComponentState(*states[i]).frozen_at is None for i in (0, 1, 3))
    rewrapped = _wrap(params, opt.optimizer)  # over the same inner groups: adopts the freeze set
    assert [c.frozen for c in rewrapped.components] == [False, False, True, False]


def test_frozen_components_leave_the_per_step_work(monkeypatch):
    params = _params(5)
    opt = _wrap(params, metric="grad_delta_l1")
    for s in range(2):
        _grads(params, zero={0, 1, 2, 3}, seed=s)
        opt.step()  # a zero gradient twice: delta 0, components 0-3 freeze at the second check
    assert [c.frozen for c in opt.components] == [True, True, True, True, False]
    assert [c for c, _ in opt._layout().live] == [4]
    assert all("grades_prev_grad" not in opt.state.get(p, {}) for p in params[:4])  # dropped at the freeze
    seen = []
    real = optimizer_mod.mag.component_magnitudes

    def spy(tensors, owners, *a, **k):
        seen.append(list(owners))
        return real(tensors, owners, *a, **k)

    monkeypatch.setattr(optimizer_mod.mag, "component_magnitudes", spy)
    _grads(params, seed=5)
    opt.step()
    assert seen == [[4]]  # only the live component is measured
    assert len(opt.last_check) == 1 and opt.last_check[0].component == "layers.4.q_proj"


def test_history_is_bounded_by_default_and_the_timeline_stays_complete():
    assert optimizer_mod.DEFAULT_HISTORY >= 100_000  # a few thousand checks of a 36-matrix model
    params = _params(4)
    bounded, full = _wrap(params, record_history=6), _wrap(copy.deepcopy(params), record_history=True)
    assert _wrap(_params(2)).record_history == optimizer_mod.DEFAULT_HISTORY
    for s in range(10):
        for opt in (bounded, full):
            ps = [p for p in (c for g in opt.param_groups for c in g["params"])]
            _grads(ps, zero={1} if s == 7 else (), seed=s)
            opt.step()
    assert len(full.history) == 10 * 4 - 2  # component 1 froze at step 8: no records after
    assert 6 <= len(bounded.history) <= 12 and bounded.history == full.history[-len(bounded.history):]
    for mine, ref in zip(bounded.timeline(), full.timeline()):
        want = [r for r in full.history if r.component == ref["name"]][-1]
        assert mine == ref and mine["last"] == want
    assert bounded.timeline()[1]["frozen_at_step"] == 8 and bounded.timeline()[1]["last"].step == 8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["grad", "zero", "none", "small"]), min_size=4, max_size=4),
                min_size=1, max_size=8),
       st.integers(1, 2), st.integers(1, 2), st.sampled_from([0.0, 0.5]))
def test_live_only_rule_matches_the_rule_applied_to_every_component(script, patience, interval, ema):
    """The wrapper's freeze steps equal rule.decide run over all components by hand (the spec)."""
    params = _params(4)
    opt = _wrap(params, tau=0.5, patience=patience, check_interval=interval, ema=ema)
    cfg = RuleConfig(tau=0.5, patience=patience, ema=ema)
    states = [ComponentState() for _ in params]
    for step, row in enumerate(script, start=1):
        for p, kind in zip(params, row):
            p.grad = None if kind == "none" else (
                torch.zeros_like(p) if kind == "zero" else torch.full_like(p, 0.1 if kind == "small" else 2.0))
        values = [None if kind == "none" else p.grad.abs().mean().item() for p, kind in zip(params, row)]
        opt.step()  # (it drops the gradients of what it freezes: the readings are taken before)
        if step % interval:
            continue
        for c, value in enumerate(values):
            states[c] = decide(states[c], value, step, cfg)[0]
    assert [c.frozen_at_step for c in opt.components] == [s.frozen_at for s in states]
    assert opt.should_stop == all(s.frozen_at is not None for s in states)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_fused_path_checks_parameters_once_per_parameter_set(monkeypatch):
    """On a steady step the fused path re-checks no parameter; a new gradient buffer or a freeze
    makes it check again, and a gradient it cannot take still sends the step to the reference path."""
    from grades_optim import fused_step

    params = _params(4)
    opt = _wrap(params, impl="triton")
    calls = []
    real = fused_step._param_reason
    monkeypatch.setattr(fused_step, "_param_reason", lambda *a: (calls.append(1), real(*a))[1])

    def stable_grads(seed):
        g = torch.Generator().manual_seed(seed)
        for p in params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(torch.randn(p.shape, generator=g))  # same buffers: same addresses

    stable_grads(0)
    opt.step()
    assert opt.fast_path is not None and len(calls) == 4
    for s in range(1, 3):
        stable_grads(s)
        opt.step()
    assert len(calls) == 4  # nothing changed: no parameter re-checked
    params[3].grad = torch.randn(2, 3).t()  # a new, non-contiguous gradient buffer
    opt.step()
    assert len(calls) > 4 and opt.fast_path is None and "non-contiguous" in opt.fast_path_reason
    params[3].grad = params[3].grad.contiguous()
    before = len(calls)
    opt.step()
    assert opt.fast_path is not None and len(calls) == before + 4


def test_checkpoints_carry_the_bounded_history_and_the_complete_timeline(tmp_path):
    from grades_optim.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(3)])
    params = [m.weight for m in model]
    opt = _wrap(params, record_history=2)
    for s in range(6):
        _grads(params, zero={0} if s == 1 else (), seed=s)
        opt.step()
    assert opt.components[0].frozen_at_step == 2 and len(opt.history) <= 4
    save_checkpoint(tmp_path, step=6, model=model, optimizer=opt)
    model2 = copy.deepcopy(model)
    fresh = _wrap([m.weight for m in model2], record_history=2)
    load_checkpoint(tmp_path, model=model2, optimizer=fresh)
    assert fresh.history == opt.history
    assert fresh.timeline() == opt.timeline()
    assert fresh.timeline()[0]["last"].step == 2  # the reading it froze on, long out of history


# --- small CPU tensors are reduced and copied stacked (one op per shape, not one per tensor) ------

_SHAPES = [(), (1,), (2, 2), (3, 2), (2, 3), (0, 4), (5,), (40, 3)]
_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _tensor(shape, dtype, strided, gen):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if strided and len(shape) == 2:  # a transposed view: not contiguous, same shape
        t = (torch.randn(shape[::-1], generator=gen, dtype=torch.float64) * 3).t()
    return t.to(dtype)


_stack_spec = st.lists(st.tuples(st.integers(0, len(_SHAPES) - 1), st.integers(0, len(_DTYPES) - 1),
                                 st.booleans()), max_size=30)


@settings(max_examples=60, deadline=None)
@given(specs=_stack_spec, ord=st.sampled_from([1, 2]), limit=st.sampled_from([0, 4, 4096]),
       seed=st.integers(0, 2**31 - 1))
def test_stacked_sums_and_delta_sums_match_float64(specs, ord, limit, seed):
    """Repeated shapes form stacked groups (``limit``: the size above which tensors keep the
    foreach path), mixed with singletons, other dtypes, empty, 0-d and non-contiguous tensors."""
    from unittest import mock

    from grades_optim.kernels import dispatch

    gen = torch.Generator().manual_seed(seed)
    a = [_tensor(_SHAPES[s], _DTYPES[d], strided, gen) for s, d, strided in specs]
    b = [(x.double() + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(_DTYPES[(d + 1) % 3])
         for x, (_, d, _) in zip(a, specs)]
    want = [x.double().abs().sum() if ord == 1 else x.double().square().sum() for x in a]
    want_delta = [(x.double() - y.double()).abs().sum() if ord == 1 else (x.double() - y.double()).square().sum()
                  for x, y in zip(a, b)]
    with mock.patch.object(dispatch, "STACK_MAX_NUMEL", limit):
        got, got_delta = dispatch.torch_tensor_sums(a, ord), dispatch.torch_tensor_delta_sums(a, b, ord)
    for g, w in ((got, want), (got_delta, want_delta)):
        assert g.dtype == torch.float32 and g.shape == (len(a),)
        w = torch.stack(w) if w else torch.zeros(0, dtype=torch.float64)
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_stack_groups_groups_only_same_shape_and_dtype_small_cpu_tensors():
    from grades_optim.kernels import dispatch

    big = torch.zeros(dispatch.STACK_MAX_NUMEL + 1)
    ts = [torch.zeros(2, 2), torch.zeros(4), torch.zeros(2, 2), big, torch.zeros(2, 2, dtype=torch.bfloat16),
          torch.zeros(4), torch.zeros(2, 2).t(), big.clone()]
    groups, rest = dispatch.stack_groups(ts)
    assert sorted(map(sorted, groups)) == [[0, 2, 6], [1, 5]]
    assert sorted(rest) == [3, 4, 7]
    # pairs: position 2's partner has another shape, so it leaves the group
    others = [torch.zeros(2, 2), torch.zeros(4), torch.zeros(4), big, torch.zeros(2, 2), torch.zeros(4),
              torch.zeros(2, 2), big]
    groups, rest = dispatch.stack_groups(ts, others)
    assert sorted(map(sorted, groups)) == [[0, 6], [1, 5]] and sorted(rest) == [2, 3, 4, 7]


@pytest.mark.parametrize("limit", [0, 4096])
def test_stacked_update_snr_sums_match_float64(limit, monkeypatch):
    """Per-tensor bias corrections (different step counts, betas, eps) inside stacked groups, and
    the same on the foreach path (``limit`` 0: nothing is stacked)."""
    from grades_optim.kernels import dispatch

    monkeypatch.setattr(dispatch, "STACK_MAX_NUMEL", limit)
    from grades_optim import magnitudes

    gen = torch.Generator().manual_seed(3)
    shapes = [(2, 2)] * 5 + [(3,)] * 2 + [(70, 70)]
    states, betas, eps, want = [], [], [], []
    for i, s in enumerate(shapes):
        m = torch.randn(s, generator=gen, dtype=torch.float64) * 1e-3
        v = torch.rand(s, generator=gen, dtype=torch.float64) * 1e-6
        t, (b1, b2), e = float(3 + i), ((0.9, 0.999) if i % 2 else (0.8, 0.99)), (1e-8 if i % 3 else 1e-6)
        c1, c2 = 1 / (1 - b1 ** t), 1 / (1 - b2 ** t)
        want.append((m * c1).abs().div((v * c2).sqrt() + e).sum())
        states.append({"exp_avg": m.float(), "exp_avg_sq": v.float(), "step": torch.tensor(t)})
        betas.append((b1, b2))
        eps.append(e)
    got = magnitudes.update_snr_sums([torch.zeros(s) for s in shapes], states, betas, eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-4, atol=0)


def test_copy_buffers_refill_in_place_and_refuse_a_new_shape():
    from grades_optim import magnitudes

    ts = [torch.randn(2, 2) for _ in range(3)] + [torch.randn(5), torch.randn(70, 70)]
    bufs = magnitudes.CopyBuffers(ts)
    first = bufs.copies
    assert all(torch.equal(c, t) and c.data_ptr() != t.data_ptr() for c, t in zip(first, ts))
    new = [t + 1 for t in ts]
    again = bufs.refill(new)
    assert all(x is y for x, y in zip(again, first))  # the same tensors, refilled
    assert all(torch.equal(c, t) for c, t in zip(again, new))
    new[1] = torch.randn(4)  # another shape inside the stacked group
    with pytest.raises(RuntimeError):
        bufs.refill(new)
    with pytest.raises(RuntimeError):  # the whole group changed shape: stack(out=) would resize
        bufs.refill([torch.randn(1, 4) for _ in range(3)] + new[3:])


@pytest.mark.parametrize("metric", ["grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1", "update_snr"])
def test_float64_models_are_measured(metric):
    """fp64 parameters (a `.double()` model): `_foreach_norm(dtype=float32)` refuses them, which
    crashed the reference path's first check; readings must match a float64 reference."""
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(80, 80, dtype=torch.float64))  # above the stacking size: foreach
    params = [nn.Parameter(torch.randn(3, 2, dtype=torch.float64)) for _ in range(3)] + [big]
    opt = _wrap(params, metric=metric, check_interval=1)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        prev = [p.grad.clone() for p in params]
        opt.step()
    readings = [r.metric for r in opt.last_check]
    if metric in ("grad_l1", "grad_l2"):
        want = [(g.abs().mean() if metric == "grad_l1" else g.square().mean().sqrt()).item() for g in prev]
        assert readings == pytest.approx(want, rel=1e-5)
    assert len(readings) == 4 and all(r == r and r > 0 for r in readings), readings
