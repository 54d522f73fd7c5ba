"""The plain-loop patterns documented in docs/integrations.md, each run as written (CPU).

Gradient accumulation, ``torch.amp.GradScaler``, gradient clipping, LR schedulers, the early-stop
check and a checkpoint/resume round trip. The checks are on what GradES *measures* (the gradient
the inner optimizer is about to apply) and on steps being counted once per optimizer step.
"""
import io

import pytest
import torch

from grades_optim import GradESOptimizer
from tests.conftest import batch, make_model

NEVER = 1e-30  # a tau no gradient reaches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def expected_metric(opt, comp):
    """grad_l1 with reduction="mean": mean |g| over the component's tensors, as GradES defines it."""
    grads = [opt.param_groups[g]["params"][i].grad for g, i in comp.positions]
    return float(sum(gr.abs().sum() for gr in grads) / sum(gr.numel() for gr in grads))


def metrics_at(opt, step):
    return {r.component: r.metric for r in opt.history if r.step == step}


def test_gradient_accumulation_counts_optimizer_steps_and_sees_the_summed_gradient():
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, tau=NEVER)
    accum = 3
    expected = {}
    # -- pattern ------------------------------------------------------------------------------
    for i in range(2 * accum):
        loss = model.loss(batch(i)) / accum  # scale so the accumulated gradient is a mean
        loss.backward()
        if (i + 1) % accum == 0:
            expected[opt.step_count + 1] = {c.name: expected_metric(opt, c) for c in opt.components}
            opt.step()
            opt.zero_grad()
            if opt.should_stop:
                break
    # ------------------------------------------------------------------------------------------
    assert opt.step_count == 2
    for step, want in expected.items():
        assert metrics_at(opt, step) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradscaler_with_clipping_measures_unscaled_clipped_gradients(dtype):
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, tau=NEVER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    expected = []
    # -- pattern ------------------------------------------------------------------------------
    for i in range(3):
        with torch.autocast("cpu", dtype=dtype):
            loss = model.loss(batch(i))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # the wrapper (the object passed to scaler.step), never opt.optimizer
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        expected.append({c.name: expected_metric(opt, c) for c in opt.components})
        scaler.step(opt)      # skips opt.step() on inf/NaN: GradES does not count that step
        scaler.update()
        opt.zero_grad()
        if opt.should_stop:
            break
    # ------------------------------------------------------------------------------------------
    assert opt.step_count == 3
    total = sum(expected[0].values())
    assert total < 1.0  # unscaled: a 4096× scaled gradient would be far larger
    for step, want in enumerate(expected, start=1):
        assert metrics_at(opt, step) == pytest.approx(want, rel=1e-6)


def test_clipping_before_step_is_what_gradES_measures():
    model = make_model()
    opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, tau=NEVER)
    model.loss(batch(0)).backward()
    raw = {c.name: expected_metric(opt, c) for c in opt.components}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    clipped = {c.name: expected_metric(opt, c) for c in opt.components}
    opt.step()
    assert float(norm) > 1e-3  # clipping was active
    assert metrics_at(opt, 1) == pytest.approx(clipped, rel=1e-6)
    assert all(metrics_at(opt, 1)[k] < raw[k] for k in raw)


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "sequential", "plateau"])
def test_lr_schedulers_attach_to_the_wrapper_and_drive_the_inner(kind):
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, tau=NEVER)
    sched = {
        "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10),
        "sequential": lambda: torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)], milestones=[2]),
        "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
    }[kind]()
    lrs = []
    for i in range(4):
        loss = model.loss(batch(i))
        loss.backward()
        opt.step()
        sched.step(loss.item() + 10 * i) if kind == "plateau" else sched.step()  # plateau: worsening loss
        opt.zero_grad()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) > 1  # the inner optimizer saw the schedule
    assert opt.param_groups[0]["lr"] == lrs[-1]


def test_checkpoint_resume_in_a_plain_loop_continues_identically():
    def build():
        model = make_model()
        opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model,
                              tau=0.5, tau_mode="relative", metric="weight_delta_l1")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / 8))
        return model, opt, sched

    def run(model, opt, sched, steps):
        for i in steps:
            model.loss(batch(i)).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            if opt.should_stop:
                break

    model, opt, sched = build()
    run(model, opt, sched, range(0, 2))
    buf = io.BytesIO()
    # -- pattern: save / load ---------------------------------------------------------------
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = build()  # built exactly as for the saved run
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])  # restores the freeze set and the GradES step counter
    sched2.load_state_dict(ckpt["sched"])
    # ------------------------------------------------------------------------------------------
    frozen = [c.frozen_at_step for c in opt.components]
    assert 0 < sum(f is not None for f in frozen) < len(frozen)  # a partial freeze set to restore
    assert [c.frozen_at_step for c in opt2.components] == frozen and opt2.step_count == 2
    run(model, opt, sched, range(2, 8))
    run(model2, opt2, sched2, range(2, 8))
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    assert [c.frozen_at_step for c in opt2.components] == [c.frozen_at_step for c in opt.components]


def test_should_stop_check_ends_the_loop_before_a_step_with_nothing_to_train():
    model = make_model()
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, tau=1e9,
                          grace_steps=3)  # steps 1-2 are the grace period
    steps = 0
    for i in range(10):
        model.loss(batch(i)).backward()
        opt.step()
        opt.zero_grad()
        steps += 1
        if opt.should_stop:
            break
    assert steps == 3 and all(c.frozen_at_step == 3 for c in opt.components)
