"""Properties of the pure freeze rule (grades_optim.rule)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grades_optim.rule import ComponentState, RuleConfig, decide, decide_all, should_stop

readings = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                     st.floats(min_value=0.0, max_value=10.0))
configs = st.builds(RuleConfig, tau=st.floats(min_value=1e-3, max_value=5.0),
                    grace_steps=st.integers(0, 20), patience=st.integers(1, 4),
                    ema=st.sampled_from([0.0, 0.5, 0.9]), tau_mode=st.sampled_from(["absolute", "relative"]))


def run(cfg, seq, interval=1):
    """Feed a sequence of readings at steps interval, 2*interval, ...; return states after each."""
    state, out = ComponentState(), []
    for k, m in enumerate(seq, start=1):
        state, _, _ = decide(state, m, k * interval, cfg)
        out.append(state)
    return out


@settings(max_examples=300, deadline=None)
@given(cfg=configs, seq=st.lists(readings, max_size=40), interval=st.integers(1, 3))
def test_never_freezes_during_grace(cfg, seq, interval):
    for k, state in enumerate(run(cfg, seq, interval), start=1):
        if k * interval < cfg.grace_steps:
            assert state.frozen_at is None
        if state.frozen_at is not None:
            assert state.frozen_at >= cfg.grace_steps


@settings(max_examples=300, deadline=None)
@given(cfg=configs, seq=st.lists(readings, max_size=40))
def test_once_frozen_always_frozen(cfg, seq):
    frozen_at = None
    for state in run(cfg, seq):
        if frozen_at is not None:
            assert state.frozen_at == frozen_at
        frozen_at = state.frozen_at


@settings(max_examples=300, deadline=None)
@given(cfg=configs, prefix=st.lists(readings, max_size=20), bad=st.sampled_from([None, math.nan, math.inf]))
def test_unusable_reading_never_freezes(cfg, prefix, bad):
    states = run(cfg, prefix)
    before = states[-1] if states else ComponentState()
    after, _, _ = decide(before, bad, len(prefix) + 1 + cfg.grace_steps, cfg)
    assert (after.frozen_at is None) == (before.frozen_at is None)
    if before.frozen_at is None:
        assert after.below == 0


@settings(max_examples=200, deadline=None)
@given(cfg=configs, n=st.integers(1, 40))
def test_nothing_measured_never_freezes(cfg, n):
    assert all(s.frozen_at is None for s in run(cfg, [None] * n))


@settings(max_examples=200, deadline=None)
@given(tau=st.floats(1e-3, 5.0), patience=st.integers(1, 5), grace=st.integers(0, 10),
       n_above=st.integers(0, 10))
def test_paper_rule_freezes_after_patience_consecutive_readings(tau, patience, grace, n_above):
    cfg = RuleConfig(tau=tau, grace_steps=grace, patience=patience)
    seq = [tau * 2] * (grace + n_above) + [tau / 2] * patience
    states = run(cfg, seq)
    assert states[-1].frozen_at == len(seq)
    assert all(s.frozen_at is None for s in states[:-1])


@pytest.mark.parametrize("grace", [1, 2, 7])
def test_a_freeze_is_possible_at_the_grace_boundary_step_itself(grace):
    # the released code: `current_step >= min_steps_before_freeze`, with min_steps = int(alpha * T)
    states = run(RuleConfig(tau=1.0, grace_steps=grace), [0.5] * (grace + 2))
    assert [s.frozen_at for s in states][grace - 1:] == [grace] * 3
    assert all(s.frozen_at is None for s in states[:grace - 1])


def test_streak_is_broken_by_a_reading_above_threshold():
    cfg = RuleConfig(tau=1.0, patience=3)
    states = run(cfg, [0.5, 0.5, 2.0, 0.5, 0.5, 0.5])
    assert [s.frozen_at for s in states] == [None] * 5 + [6]


def test_threshold_is_strict():
    assert run(RuleConfig(tau=1.0), [1.0])[-1].frozen_at is None


def test_relative_threshold_is_scale_free():
    base = [4.0, 3.0, 2.0, 1.0, 0.5, 0.2]
    cfg = RuleConfig(tau=0.1, grace_steps=3, tau_mode="relative")
    for scale in (1e-9, 1.0, 1e6):
        states = run(cfg, [x * scale for x in base])
        # reference = mean of the grace readings, steps 1 and 2 (3.5 × scale); 0.2 × scale < 0.35 × scale
        assert [s.frozen_at for s in states] == [None] * 5 + [6]


def test_relative_without_grace_uses_first_reading_as_reference():
    states = run(RuleConfig(tau=0.5, tau_mode="relative"), [0.01, 0.004])
    assert [s.frozen_at for s in states] == [None, 2]


def test_ema_smooths_a_single_dip():
    cfg = RuleConfig(tau=1.0, ema=0.9)
    states = run(cfg, [10.0, 0.0, 10.0])
    assert all(s.frozen_at is None for s in states)
    assert run(RuleConfig(tau=1.0), [10.0, 0.0])[-1].frozen_at == 2


@settings(max_examples=100, deadline=None)
@given(cfg=configs, seqs=st.lists(st.lists(readings, min_size=5, max_size=5), min_size=1, max_size=6),
       perm_seed=st.randoms())
def test_decisions_do_not_depend_on_component_order(cfg, seqs, perm_seed):
    order = list(range(len(seqs)))
    perm_seed.shuffle(order)

    def run_all(idx):
        states = [ComponentState() for _ in idx]
        for step in range(5):
            res = decide_all(states, [seqs[i][step] for i in idx], step + 1, cfg)
            states = [r[0] for r in res]
        return dict(zip(idx, states))

    assert run_all(list(range(len(seqs)))) == run_all(order)


def test_should_stop_ratio():
    frozen, live = ComponentState(frozen_at=3), ComponentState()
    assert not should_stop([], 1.0)
    assert should_stop([frozen, frozen], 1.0)
    assert not should_stop([frozen, live], 1.0)
    assert should_stop([frozen, live], 0.5)


def test_decide_all_length_mismatch():
    with pytest.raises(ValueError, match="2 metrics for 1 components"):
        decide_all([ComponentState()], [1.0, 2.0], 1, RuleConfig(tau=1.0))


# -- peak_gate: a reading counts as converged only once the gradient fell from its peak ----------
def run_gated(cfg, seq, gates):
    state, out = ComponentState(), []
    for k, (m, g) in enumerate(zip(seq, gates), start=1):
        state, _, _ = decide(state, m, k, cfg, g)
        out.append(state)
    return out


@settings(max_examples=300, deadline=None)
@given(cfg=configs, seq=st.lists(readings, min_size=1, max_size=30), data=st.data(),
       gate=st.sampled_from([0.5, 0.8, 1.0]))
def test_peak_gate_never_freezes_earlier_than_the_ungated_rule(cfg, seq, data, gate):
    gates = data.draw(st.lists(readings, min_size=len(seq), max_size=len(seq)))
    plain = run(cfg, seq)[-1].frozen_at
    gated_cfg = RuleConfig(**{**cfg.__dict__, "peak_gate": gate})
    gated = run_gated(gated_cfg, seq, gates)[-1].frozen_at
    assert gated is None or (plain is not None and gated >= plain)


def test_peak_gate_holds_a_plateau_until_the_gradient_falls():
    # the metric reads "converged" (below tau) from the start; the gradient L1 stays at its level
    # for 6 checks, then falls to a quarter of it
    cfg = RuleConfig(tau=0.3, patience=2, peak_gate=0.8)
    seq, gates = [0.1] * 12, [4.0] * 6 + [1.0] * 6
    assert run(RuleConfig(tau=0.3, patience=2), seq)[-1].frozen_at == 2  # ungated: frozen at once
    states = run_gated(cfg, seq, gates)
    assert [s.frozen_at for s in states][:7] == [None] * 7
    assert states[-1].frozen_at == 8  # open at checks 7 and 8 (1.0 < 0.8 × 4.0): patience 2
    assert states[5].gate == 4.0 and states[5].gate_peak == 4.0


def test_peak_gate_smooths_its_reading_with_the_rule_ema():
    cfg = RuleConfig(tau=0.3, ema=0.5, peak_gate=0.8)
    states = run_gated(cfg, [0.1] * 3, [4.0, 2.0, 2.0])
    assert [s.gate for s in states] == [4.0, 3.0, 3.0]  # EMA 0.5; a frozen state is final
    assert [s.frozen_at for s in states] == [None, 2, 2]  # 3.0 < 0.8 × 4.0 at check 2


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_peak_gate_without_a_reading_stays_shut(bad):
    cfg = RuleConfig(tau=0.3, peak_gate=0.8)
    states = run_gated(cfg, [0.1] * 4, [4.0, bad, bad, bad])
    assert all(s.frozen_at is None for s in states) and states[-1].gate == 4.0


def test_peak_gate_follows_the_gradient_through_the_grace_period():
    # the peak is set during the grace period: a gradient that fell before grace ended is open at once
    cfg = RuleConfig(tau=0.3, grace_steps=3, peak_gate=0.8)
    states = run_gated(cfg, [0.1] * 4, [4.0, 1.0, 1.0, 1.0])
    assert [s.frozen_at for s in states] == [None, None, 3, 3]


def test_states_saved_before_peak_gate_load():
    # checkpoints written before the gate fields held six numbers per component
    state = ComponentState(*[None, 2, 0.5, 1.0, 2, None])
    assert state.gate is None and state.gate_peak == 0.0
    assert decide(state, 0.1, 5, RuleConfig(tau=0.3, patience=3, peak_gate=0.8), 1.0)[0].below == 0


def test_decide_all_gate_length_mismatch():
    with pytest.raises(ValueError, match="1 gate readings for 2 components"):
        decide_all([ComponentState()] * 2, [1.0, 2.0], 1, RuleConfig(tau=1.0, peak_gate=0.5), [1.0])
