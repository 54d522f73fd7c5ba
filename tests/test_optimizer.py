"""GradESOptimizer: the optimizer contract, freezing, equivalence and checkpoints (CPU)."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from grades_optim import GradESOptimizer
from tests.conftest import batch, make_model

NEVER = 1e-30  # a tau no gradient reaches: nothing ever freezes


class ZeroFillSGD(torch.optim.Optimizer):
    """Third-party style: treats a missing gradient as zero, so weight decay still moves the param."""

    def __init__(self, params, lr=0.1, weight_decay=0.1):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                st = self.state[p]
                st["buf"] = st.get("buf", torch.zeros_like(p)) * 0.9 + g
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(st["buf"], alpha=-group["lr"])


INNERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "third_party": lambda ps: ZeroFillSGD(ps),
}


def inject(model, seed, scale=None):
    """Deterministic fake gradients; ``scale`` maps a name substring to a multiplier."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.grad = None
            continue
        s = 1.0
        for key, val in (scale or {}).items():
            if key in name:
                s = val
        p.grad = (torch.randn(p.shape, generator=g) * s).to(p.dtype)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def wrap(model, inner="adamw", **kw):
    kw.setdefault("tau", NEVER)
    return GradESOptimizer(INNERS[inner](model.parameters()), model=model, **kw)


# -- contract ------------------------------------------------------------------------------
def test_is_an_optimizer_and_delegates(tiny_model):
    inner = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    opt = GradESOptimizer(inner, model=tiny_model, tau=1.0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults and opt.optimizer is inner
    new_groups = [dict(g) for g in inner.param_groups]
    opt.param_groups = new_groups
    assert inner.param_groups is new_groups
    assert len(opt.components) == 14 and {c.kind for c in opt.components} == {"attention", "mlp"}
    assert "GradESOptimizer(AdamW" in repr(opt)


def test_lr_schedulers_drive_the_inner_optimizer(tiny_model):
    opt = wrap(tiny_model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for s in range(3):
        inject(tiny_model, s)
        opt.step()
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    seq = torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.ConstantLR(opt), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)], [2])
    seq.step()
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10).step()


def test_step_hooks_and_state_dict_hooks_run(tiny_model):
    opt = wrap(tiny_model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    inject(tiny_model, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "load_post"]


def test_closure_zero_grad_and_add_param_group(tiny_model):
    opt = wrap(tiny_model)
    ids = batch(0)

    def closure():
        opt.zero_grad()
        loss = tiny_model.loss(ids)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.step_count == 1
    opt.zero_grad()
    assert all(p.grad is None for p in tiny_model.parameters())
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["grades_cid"] == [-1]
    extra.grad = torch.ones(3)
    inject(tiny_model, 1)
    opt.step()
    assert not torch.equal(extra, torch.zeros(3))


def test_gradscaler_overflow_steps_are_not_counted(tiny_model):
    opt = wrap(tiny_model, inner="sgd_momentum")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = params_of(tiny_model)
    scaler.scale(tiny_model.loss(batch(0))).backward()
    tiny_model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 0 and all(torch.equal(before[n], p) for n, p in tiny_model.named_parameters())
    opt.zero_grad()
    scaler.scale(tiny_model.loss(batch(1))).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 1


def test_gradscaler_unscales_before_measuring():
    model = make_model()
    opt = wrap(model, inner="adamw")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = model.loss(batch(0))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    ref = make_model()
    ref.loss(batch(0)).backward()
    comp = opt.components[0]
    p = dict(ref.named_parameters())
    expected = sum(p[n].grad.abs().sum().item() for n in comp.param_names) / comp.numel
    assert opt.history[0].metric == pytest.approx(expected, rel=1e-5)


# -- equivalence and freezing ----------------------------------------------------------------
@pytest.mark.parametrize("inner", ["adamw", "adam", "sgd_momentum"])
def test_tau_that_never_triggers_is_bit_identical_to_bare_inner(inner):
    a, b = make_model(), make_model()
    opt = wrap(a, inner=inner)
    bare = INNERS[inner](b.parameters())
    for s in range(50):
        inject(a, s)
        inject(b, s)
        opt.step()
        bare.step()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    assert opt.summary()["frozen"] == 0 and opt.step_count == 50


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_frozen_params_stay_bit_identical_and_state_is_released(inner):
    model = make_model()
    opt = GradESOptimizer(INNERS[inner](model.parameters()), model=model, tau=0.05, grace_steps=4,
                          reduction="mean")  # steps 1-3 are the grace period; step 4 may freeze
    attn = {"self_attn": 1e-3}  # attention grads far below tau, MLP grads far above
    for s in range(3):
        inject(model, s, attn)
        opt.step()
    assert opt.summary()["frozen"] == 0  # grace
    inject(model, 3, attn)
    opt.step()
    frozen = [c for c in opt.components if c.frozen]
    assert {c.kind for c in frozen} == {"attention"} and len(frozen) == 8
    assert all(c.frozen_at_step == 4 for c in frozen)
    snapshot = params_of(model)
    frozen_names = {n for c in frozen for n in c.param_names}
    for s in range(4, 10):
        inject(model, s, attn)  # a user loop that still produces grads must not move them
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen_names:
            assert torch.equal(p, snapshot[n]), n
            assert not p.requires_grad and p.grad is None
            st = opt.state.get(p, {})
            assert all(not torch.is_tensor(v) or v.numel() <= 1 for v in st.values()), (n, list(st))
        elif "mlp" in n:
            assert not torch.equal(p, snapshot[n]), n
    # every inner here keeps per-element state (moments, momentum, row/col factors, sums)
    assert opt.released_state_bytes > 0 and opt.summary()["released_state_bytes"] == opt.released_state_bytes


def test_released_bytes_match_adam_moments():
    model = make_model()
    opt = GradESOptimizer(torch.optim.Adam(model.parameters()), model=model, tau=0.05)
    inject(model, 0, {"self_attn": 1e-3})
    opt.step()
    frozen = [c for c in opt.components if c.frozen]
    assert opt.released_state_bytes == sum(c.numel for c in frozen) * 2 * 4  # exp_avg + exp_avg_sq fp32
    p = model.model.layers[0].self_attn.q_proj.weight
    assert set(opt.state[p]) == {"step"}


def test_skip_mode_keeps_requires_grad_and_reasserts_every_step():
    model = make_model()
    opt = wrap(model, tau=0.05, freeze_mode="skip")
    inject(model, 0, {"self_attn": 1e-3})
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.components[0].frozen and q.requires_grad and opt.freeze_mode == "skip"
    before = q.detach().clone()
    inject(model, 1)
    opt.step()
    assert torch.equal(q, before) and q.grad is None


def test_requires_grad_is_reasserted_after_external_flip():
    model = make_model()
    opt = wrap(model, tau=0.05)
    inject(model, 0, {"self_attn": 1e-3})
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not q.requires_grad
    q.requires_grad_(True)  # e.g. PEFT set_adapter
    before = q.detach().clone()
    inject(model, 1)
    opt.step()
    assert not q.requires_grad and torch.equal(q, before)


def test_real_training_freezes_and_stops():
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model,
                          tau=0.9, tau_mode="relative", grace_steps=5, patience=2)
    for s in range(400):
        opt.zero_grad()
        model.loss(batch(s % 8)).backward()
        opt.step()
        if opt.should_stop:
            break
    s = opt.summary()
    assert opt.should_stop and s["frozen"] == s["tracked"] == 14 and s["frozen_ratio"] == 1.0
    assert s["frozen_numel"] == s["tracked_numel"]
    assert all(c.frozen_at_step > 5 for c in opt.components)
    rec = opt.history[0]
    assert rec.step == 1 and rec.component == opt.components[0].name and not rec.frozen
    assert sum(r.frozen for r in opt.history) == 14


def test_max_frozen_ratio_stops_early():
    model = make_model()
    opt = wrap(model, tau=0.05, max_frozen_ratio=0.5)
    inject(model, 0, {"self_attn": 1e-3})
    opt.step()
    assert opt.summary()["frozen_ratio"] == pytest.approx(8 / 14) and opt.should_stop


def test_alpha_grace_and_check_interval():
    model = make_model()
    opt = wrap(model, tau=0.05, alpha=0.3, total_steps=20, check_interval=4)
    assert opt.grace_steps == 6
    for s in range(8):
        inject(model, s, {"self_attn": 1e-3})
        opt.step()
        # checks at steps 4 and 8 only; step 4 is inside the grace period
        assert opt.summary()["frozen"] == (8 if s + 1 >= 8 else 0)
    assert sorted({r.step for r in opt.history}) == [4, 8]
    opt.set_total_steps(100)
    assert opt.grace_steps == 30


@pytest.mark.parametrize("metric", ["grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_metric_values_match_a_float64_reference(metric, reduction):
    model = make_model()
    opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, tau=NEVER,
                          metric=metric, reduction=reduction)
    named = dict(model.named_parameters())
    prev = None
    for s in range(3):
        inject(model, s)
        grads = {n: p.grad.double().clone() for n, p in named.items()}
        before = {n: p.detach().double().clone() for n, p in named.items()}
        opt.step()
        recs = [r for r in opt.history if r.step == s + 1]
        for comp, rec in zip(opt.components, recs):
            if metric == "grad_l1":
                xs = [grads[n] for n in comp.param_names]
            elif metric == "grad_l2":
                xs = [grads[n] for n in comp.param_names]
            elif metric == "grad_delta_l1":
                xs = None if prev is None else [grads[n] - prev[n] for n in comp.param_names]
            else:
                xs = [named[n].detach().double() - before[n] for n in comp.param_names]
            if xs is None:
                assert math.isnan(rec.metric)
                continue
            total = sum((x.abs().sum() if metric != "grad_l2" else (x * x).sum()).item() for x in xs)
            if reduction == "mean":
                total /= comp.numel
            if metric == "grad_l2":
                total = math.sqrt(total)
            assert rec.metric == pytest.approx(total, rel=1e-5), (metric, comp.name)
        prev = grads


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("interval", [2, 5])
def test_weight_delta_over_an_interval_is_the_change_since_the_previous_check(interval, impl):
    # the released code measures W_t - W_{t-k} at a check every k steps, not the last step's change
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, tau=NEVER,
                          metric="weight_delta_l1", reduction="sum", check_interval=interval, impl=impl)
    named = dict(model.named_parameters())
    start = {n: p.detach().double().clone() for n, p in named.items()}
    for s in range(1, 3 * interval + 1):
        inject(model, s)
        opt.step()
        if s % interval:
            continue
        recs = {r.component: r.metric for r in opt.history if r.step == s}
        assert len(recs) == len(opt.components)
        for comp in opt.components:
            want = sum((named[n].detach().double() - start[n]).abs().sum().item() for n in comp.param_names)
            assert recs[comp.name] == pytest.approx(want, rel=1e-5), (s, comp.name)
        start = {n: p.detach().double().clone() for n, p in named.items()}
    assert not any("grades_prev_weight" in st for st in opt.state.values())  # dropped at each check
    assert (opt.fast_path is not None) == (impl == "triton"), opt.fast_path_reason


def _snr_run(lr, grad_scale, inner="adamw", steps=4):
    model = make_model()
    inners = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.8, 0.99), eps=1e-8),
              "adam": lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-6)}
    opt = GradESOptimizer(inners[inner](model.parameters()), model=model, tau=NEVER, metric="update_snr")
    named = dict(model.named_parameters())
    for s in range(steps):
        # the same gradient sequence whatever the weights: only lr and the scale differ between runs
        g = torch.Generator().manual_seed(s)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * grad_scale + 0.3 * grad_scale
        opt.step()
    return opt, named


@pytest.mark.parametrize("inner", ["adamw", "adam"])
def test_update_snr_matches_a_float64_reference(inner):
    opt, named = _snr_run(1e-2, 1.0, inner)
    group = opt.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    recs = {r.component: r.metric for r in opt.last_check}
    for comp in opt.components:
        total = 0.0
        for n in comp.param_names:
            st = opt.state[named[n]]
            t = float(st["step"])
            m = st["exp_avg"].double() / (1 - b1 ** t)
            v = st["exp_avg_sq"].double() / (1 - b2 ** t)
            total += (m / (v.sqrt() + eps)).abs().sum().item()
        assert recs[comp.name] == pytest.approx(total / comp.numel, rel=1e-5), comp.name
        assert 0.0 < recs[comp.name] <= 1.0


def test_update_snr_ignores_the_learning_rate_and_the_gradient_scale():
    base, _ = _snr_run(1e-2, 1.0)
    for lr, scale in ((1e-5, 1.0), (1e-2, 1e3), (0.3, 1e-2)):
        other, _ = _snr_run(lr, scale)
        for a, b in zip(base.last_check, other.last_check):
            assert a.metric == pytest.approx(b.metric, rel=1e-4), (lr, scale, a.component)


def test_update_snr_needs_adam_moments():
    model = make_model()
    with pytest.raises(ValueError, match="reads Adam's moments.*SGD has none"):
        GradESOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, tau=0.2, metric="update_snr")


def test_components_without_grad_are_not_measured_nor_frozen(caplog):
    model = make_model()
    opt = wrap(model, tau=1e9, grace_steps=1)  # everything measured after the grace would freeze at once
    for step in range(3):
        inject(model, step)
        for p in model.model.layers[1].parameters():
            p.grad = None
        with caplog.at_level("WARNING", logger="grades_optim"):
            opt.step()
    frozen = {c.name for c in opt.components if c.frozen}
    assert frozen and not any(".layers.1." in n for n in frozen)
    assert all(math.isnan(r.metric) for r in opt.history if ".layers.1." in r.component)
    # they block the stop, and the user is told so once (after the grace period), by name
    assert opt.summary()["never_measured"] == 7 and not opt.should_stop
    warnings = [r.getMessage() for r in caplog.records if "no usable gradient reading" in r.getMessage()]
    assert len(warnings) == 1 and "GradES step 2: 7 of 14" in warnings[0]
    assert "layers.1.self_attn.q_proj" in warnings[0] and "layers.0." not in warnings[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_never_freeze_and_are_reported(bad, caplog):
    model = make_model()
    opt = wrap(model, tau=1e9, inner="sgd_momentum", ema=0.5, tau_mode="relative", grace_steps=1)
    inject(model, 0)
    opt.step()  # grace reading: the relative reference
    inject(model, 1)
    model.model.layers[0].self_attn.k_proj.weight.grad[0, 0] = bad
    with caplog.at_level("WARNING", logger="grades_optim"):
        opt.step()
    k = next(c for c in opt.components if c.name.endswith("layers.0.self_attn.k_proj"))
    assert not k.frozen and sum(c.frozen for c in opt.components) == 13
    assert opt.summary()["nonfinite_readings"] == 1 and "layers.0.self_attn.k_proj" in caplog.text
    state = opt._states[opt.components.index(k)]
    assert math.isfinite(state.smoothed) and math.isfinite(state.ref_sum)  # EMA/reference not poisoned
    inject(model, 2)
    opt.step()
    assert k.frozen  # a finite reading afterwards is judged normally


def test_dcp_style_dry_step_is_not_counted():
    model = make_model()
    opt = wrap(model, tau=1e9)  # a counted step with readings would freeze everything
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    assert opt.step_count == 0 and not opt.history and opt.summary()["frozen"] == 0
    assert len(opt.state) > 0  # the inner optimizer did build its state


def test_sparse_gradient_is_rejected():
    model = make_model()
    opt = wrap(model, inner="sgd_momentum")
    inject(model, 0)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.grad = q.grad.to_sparse()
    with pytest.raises(ValueError, match="Sparse gradient for model.layers.0.self_attn.q_proj"):
        opt.step()


def test_deepcopy_and_pickle_keep_the_inner_optimizer():
    model = make_model()
    opt = wrap(model, tau=0.05)
    inject(model, 0, {"self_attn": 1e-3})
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.optimizer is not opt.optimizer and clone.summary() == opt.summary()


# -- checkpoints ------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("inner", ["adamw", "sgd_momentum", "adafactor"])
def test_resume_restores_freeze_set_and_gives_identical_next_steps(inner):
    kw = dict(tau=0.05, patience=2, ema=0.2, metric="grad_delta_l1", grace_steps=2)

    def scale(s):  # attention converges from step 2, up projections from step 4
        return {"self_attn": 1e-3, **({"mlp.up_proj": 1e-3} if s >= 4 else {})} if s >= 2 else None

    a = make_model()
    opt_a = GradESOptimizer(INNERS[inner](a.parameters()), model=a, **kw)
    for s in range(6):
        inject(a, s, scale(s))
        opt_a.step()
    sd = _roundtrip(opt_a.state_dict())
    b = make_model()
    b.load_state_dict(a.state_dict())
    opt_b = GradESOptimizer(INNERS[inner](b.parameters()), model=b, **kw)
    opt_b.load_state_dict(sd)
    assert [c.frozen_at_step for c in opt_b.components] == [c.frozen_at_step for c in opt_a.components]
    assert opt_b.step_count == opt_a.step_count == 6
    assert any(c.frozen for c in opt_b.components)
    assert opt_b.released_state_bytes == opt_a.released_state_bytes > 0  # counters ride along too
    for n, p in b.named_parameters():
        frozen = any(n in c.param_names and c.frozen for c in opt_b.components)
        assert p.requires_grad != frozen, n
    assert not any(c.frozen for c in opt_b.components if "up_proj" in c.name)
    for s in range(6, 12):
        inject(a, s, scale(s))
        inject(b, s, scale(s))
        opt_a.step()
        opt_b.step()
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), (s, n)
        assert [c.frozen_at_step for c in opt_b.components] == [c.frozen_at_step for c in opt_a.components]
    assert all(c.frozen_at_step > 6 for c in opt_b.components if "up_proj" in c.name)  # after resume


def test_plain_inner_state_dict_loads_into_wrapper_and_back():
    a = make_model()
    bare = torch.optim.AdamW(a.parameters(), lr=1e-2)
    for s in range(3):
        inject(a, s)
        bare.step()
    plain = _roundtrip(bare.state_dict())
    opt = wrap(a, tau=0.05)
    opt.load_state_dict(plain)
    assert opt.summary()["frozen"] == 0 and opt.step_count == 0
    assert torch.equal(opt.state[a.lm_head.weight]["exp_avg"], bare.state[a.lm_head.weight]["exp_avg"])
    inject(a, 3, {"self_attn": 1e-3})
    opt.step()
    assert opt.summary()["frozen"] == 8
    back = torch.optim.AdamW(a.parameters(), lr=1e-2)
    back.load_state_dict(_roundtrip(opt.state_dict()))
    assert back.param_groups[0]["grades_step"] == 1
    assert torch.equal(back.state[a.lm_head.weight]["exp_avg"], opt.state[a.lm_head.weight]["exp_avg"])


def test_state_dict_from_another_layout_is_rejected_and_changes_nothing():
    a = make_model()
    opt = wrap(a, tau=0.05)
    inject(a, 0)
    opt.step()
    sd = opt.state_dict()
    other = make_model(d=12)
    opt_other = wrap(other, tau=0.05)
    before = copy.deepcopy(opt_other.state_dict())
    with pytest.raises(ValueError, match="different parameter layout"):
        opt_other.load_state_dict(sd)
    assert opt_other.state_dict() == before
    fewer = make_model(n_layers=1)
    with pytest.raises(ValueError, match="params"):
        wrap(fewer).load_state_dict(sd)
    with pytest.raises(ValueError, match="Invalid state_dict"):
        opt.load_state_dict({"state": {}})


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "Invalid tau"), (dict(tau=-1.0), "Invalid tau"), (dict(tau=float("nan")), "Invalid tau"),
    (dict(tau=float("inf")), "Invalid tau"), (dict(tau="1"), "Invalid tau"),
    (dict(tau=1.0, alpha=1.0, total_steps=10), "Invalid alpha"),
    (dict(tau=1.0, alpha=-0.1, total_steps=10), "Invalid alpha"),
    (dict(tau=1.0, alpha=0.3), "needs total_steps"),
    (dict(tau=1.0, total_steps=0), "Invalid total_steps"),
    (dict(tau=1.0, grace_steps=-1), "Invalid grace_steps"),
    (dict(tau=1.0, alpha=0.2, total_steps=10, grace_steps=3), "give one of them"),
    (dict(tau=1.0, check_interval=0), "Invalid check_interval"),
    (dict(tau=1.0, patience=0), "Invalid patience"),
    (dict(tau=1.0, ema=1.0), "Invalid ema"),
    (dict(tau=1.0, max_frozen_ratio=0.0), "Invalid max_frozen_ratio"),
    (dict(tau=1.0, metric="grad_linf"), "Invalid metric"),
    (dict(tau=1.0, reduction="max"), "Invalid reduction"),
    (dict(tau=1.0, freeze_mode="never"), "Invalid freeze_mode"),
    (dict(tau=1.0, tau_mode="percent"), "Invalid tau_mode"),
    (dict(tau=1.0, impl="cuda"), "Invalid impl"),
])
def test_bad_arguments_are_rejected_with_the_argument_name(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, **kwargs)


def test_bad_inner_model_and_components():
    model = make_model()
    with pytest.raises(TypeError, match="Invalid optimizer"):
        GradESOptimizer(model.parameters(), model=model, tau=1.0)
    inner = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="already a GradESOptimizer"):
        GradESOptimizer(GradESOptimizer(inner, model=model, tau=1.0), model=model, tau=1.0)
    with pytest.raises(TypeError, match="LBFGS"):
        GradESOptimizer(torch.optim.LBFGS(model.parameters()), model=model, tau=1.0)
    with pytest.raises(ValueError, match="needs model= .* or components="):
        GradESOptimizer(inner, tau=1.0)
    with pytest.raises(TypeError, match="Invalid model"):
        GradESOptimizer(inner, model="llama", tau=1.0)
    with pytest.raises(ValueError):
        GradESOptimizer(inner, model=nn.Sequential(nn.Linear(2, 2)), tau=1.0)  # nothing matches
    partial = torch.optim.AdamW(model.model.layers[0].parameters())
    with pytest.raises(ValueError, match="does not hold"):
        GradESOptimizer(partial, model=model, tau=1.0)
    q = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(ValueError, match="both 'a' and 'b'"):
        GradESOptimizer(inner, components={"a": q, "b": [q]}, tau=1.0)


def test_explicit_components_mapping():
    model = make_model()
    layer = model.model.layers[0]
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, tau=0.05,
                          components={"l0.q_proj": layer.self_attn.q_proj, "l0.up": ("mlp", [layer.mlp.up_proj.weight])})
    assert [(c.name, c.kind, c.numel) for c in opt.components] == [("l0.q_proj", "attention", 72), ("l0.up", "mlp", 128)]
    inject(model, 0, {"self_attn": 1e-3})
    opt.step()
    assert [c.frozen for c in opt.components] == [True, False] and not opt.should_stop


def test_bounded_history_and_last_check():
    model = make_model()
    opt = wrap(model, record_history=30)
    for s in range(10):
        inject(model, s)
        opt.step()
    assert 30 <= len(opt.history) <= 60 and opt.history[-1].step == 10
    assert [r.component for r in opt.last_check] == [c.name for c in opt.components]
    assert all(r.step == 10 for r in opt.last_check)
    quiet_model = make_model()
    quiet = wrap(quiet_model, record_history=False)
    inject(quiet_model, 0)
    quiet.step()
    assert quiet.history == [] and len(quiet.last_check) == 14
    with pytest.raises(ValueError, match="Invalid record_history"):
        wrap(make_model(), record_history=0)


@pytest.mark.parametrize("tau_mode", ["absolute", "relative"])
def test_weight_delta_at_zero_lr_is_no_reading(tau_mode):
    # HF's linear warm-up takes its first step at lr=0: the weights do not move, which must not
    # read as "converged" (absolute tau) nor become a zero reference (relative tau).
    model = make_model()
    opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model=model, tau=1e-3,
                          tau_mode=tau_mode, metric="weight_delta_l1")
    inject(model, 0)
    opt.step()
    assert not any(c.frozen for c in opt.components)
    assert all(math.isnan(r.metric) for r in opt.last_check)
    for g in opt.param_groups:
        g["lr"] = 0.1
    inject(model, 1)
    opt.step()
    assert all(math.isfinite(r.metric) and r.metric > 0 for r in opt.last_check)


# -- peak_gate ------------------------------------------------------------------------------
def _gated_run(peak_gate, fall_at=None, steps=20, impl="torch", metric="update_snr", **kw):
    """Noise gradients (update_snr reads them as converged at once); every gradient shrinks 10x from
    ``fall_at`` on."""
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, metric=metric,
                          tau=0.6 if metric == "update_snr" else 1e3, patience=2, peak_gate=peak_gate,
                          impl=impl, **kw)
    for s in range(steps):
        inject(model, s, {"": 0.1} if fall_at is not None and s >= fall_at else None)
        opt.step()
    return model, opt


def test_peak_gate_keeps_matrices_whose_gradient_has_not_fallen():
    _, plain = _gated_run(0.0, ema=0.9)
    assert {c.frozen_at_step for c in plain.components} == {11, 12}
    _, held = _gated_run(0.8, ema=0.9)
    assert not any(c.frozen for c in held.components)  # a level gradient never fell from its peak
    _, fell = _gated_run(0.8, fall_at=12, ema=0.9)  # falls at step 13; its EMA is under 0.8 × peak from 15
    assert {c.frozen_at_step for c in fell.components} == {15, 16}


@pytest.mark.parametrize("metric", ["update_snr", "grad_l1"])
def test_peak_gate_reads_the_gradient_l1_of_each_component(metric):
    model, opt = _gated_run(0.8, steps=3, metric=metric, ema=0.0)
    for comp, st in zip(opt.components, opt._states):
        grads = torch.cat([opt.param_groups[g]["params"][i].grad.flatten().double() for g, i in comp.positions])
        assert st.gate == pytest.approx(grads.abs().mean().item(), rel=1e-6), comp.name


def test_peak_gate_round_trips_through_state_dicts():
    model, opt = _gated_run(0.8, steps=6)
    saved = copy.deepcopy(opt.state_dict())
    model2 = make_model()
    opt2 = GradESOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), model=model2, metric="update_snr",
                           tau=0.6, patience=2, peak_gate=0.8)
    opt2.load_state_dict(saved)
    assert opt2._states == opt._states and all(st.gate_peak > 0 for st in opt2._states)
    with pytest.raises(AttributeError, match="fixed at construction"):
        opt2.peak_gate = 0.5
