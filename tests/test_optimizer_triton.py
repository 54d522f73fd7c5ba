"""impl="triton" (real kernels, interpreted on CPU) against impl="torch": same readings, same freezes."""
import math

import pytest
import torch

from grades_optim import GradESOptimizer
from tests.conftest import make_model
from tests.test_optimizer import inject


@pytest.mark.parametrize("metric", ["grad_l1", "grad_l2", "grad_delta_l1", "weight_delta_l1"])
def test_triton_and_torch_reach_the_same_freeze_timeline(metric):
    runs = {}
    for impl in ("torch", "triton"):
        model = make_model()
        # SGD: under Adam a weight delta is ~lr whatever the gradient scale, so it would never freeze
        opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), model=model, impl=impl,
                              metric=metric, tau=0.3, tau_mode="relative", grace_steps=2, patience=2)
        for s in range(8):
            inject(model, s, {"self_attn": 1e-3} if s >= 3 else None)
            opt.step()
        runs[impl] = opt
    ref, fast = runs["torch"], runs["triton"]
    assert fast.impl == "triton"
    assert [c.frozen_at_step for c in fast.components] == [c.frozen_at_step for c in ref.components]
    assert any(c.frozen for c in ref.components) and not all(c.frozen for c in ref.components)
    assert len(fast.history) == len(ref.history)
    for a, b in zip(ref.history, fast.history):
        assert (a.step, a.component, a.frozen) == (b.step, b.component, b.frozen)
        if math.isnan(a.metric):
            assert math.isnan(b.metric)
        else:
            assert b.metric == pytest.approx(a.metric, rel=1e-5, abs=1e-12)


def test_triton_impl_requires_a_runnable_backend(monkeypatch):
    from grades_optim import kernels

    monkeypatch.setattr(kernels, "available", lambda device=None: "no CUDA device and no interpreter")
    model = make_model()
    with pytest.raises(ValueError, match="Invalid impl: 'triton' is unavailable: no CUDA"):
        GradESOptimizer(torch.optim.AdamW(model.parameters()), model=model, tau=1.0, impl="triton")
