"""DDP, FSDP2 and DCP on CPU: gloo, 2 processes, a hard time limit, no leftover processes.

All scenarios run in one spawned process group (tests/dist_worker.py); each test checks one.
"""

import pytest
import torch

from tests.conftest import run_isolated

LIMIT_S = 240


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    rc, log = run_isolated(["-m", "tests.dist_worker", str(out)], LIMIT_S, "distributed scenarios")
    assert rc == 0, log[-5000:]

    def load(name):
        return torch.load(out / f"{name}.pt", weights_only=False)

    return load


def assert_params_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("find_unused, mode", [(1, "requires_grad"), (0, "skip")])
def test_ddp_matches_single_process_with_identical_freezes(results, find_unused, mode):
    ref = results("reference")
    ranks = [results(f"ddp_{find_unused}_{r}") for r in range(2)]
    assert any(v is not None for v in ref["frozen"].values())
    for res in ranks:
        assert res["mode"] == mode
        assert res["frozen"] == ref["frozen"]
        assert_params_close(res["params"], ref["params"])
    frozen = {n for n, s in ref["frozen"].items() if s is not None}
    for n, rg in ranks[0]["requires_grad"].items():
        in_frozen = any(n.startswith(c + ".") for c in frozen)
        assert rg == (not in_frozen or mode == "skip"), n


def test_perturbed_rank_still_agrees(results):
    r0, r1 = results("perturbed_0"), results("perturbed_1")
    assert r0["frozen"] == r1["frozen"]
    # identical readings, thresholds and decisions (repr: NaN thresholds compare unequal)
    assert repr(r0["history"]) == repr(r1["history"]) and r0["history"]
    frozen = [s for s in r0["frozen"].values() if s is not None]
    live = [s for s in r0["frozen"].values() if s is None]
    assert frozen and live  # a real mix, not trivially all-or-nothing


def test_fsdp2_sharded_reductions_match_single_process(results):
    ref = results("reference")
    for r in range(2):
        res = results(f"fsdp2_{r}")
        assert res["mode"] == "requires_grad"
        assert res["frozen"] == ref["frozen"]
        assert_params_close(res["params"], ref["params"])


def test_fsdp2_on_the_fused_path_matches_single_process(results):
    """The fused kernel on FSDP2 shards: each rank steps its local shards, the metric's partial sums are
    joined across ranks as on the reference path; freezes, parameters and (full) states as one process,
    through steps on stable gradient shards, which run the prepared steady state."""
    ref = results("reference_rescaled")
    for r in range(2):
        res = results(f"fsdp2_fused_{r}")
        assert res["fast_path"] and res["fast_path"].startswith("triton fused"), res["reason"]
        assert res["prepared_on_shards"]  # the rescaled steps kept their gradient shards: the steady state ran
        assert res["frozen"] == ref["frozen"]
        assert_params_close(res["params"], ref["params"])
        assert res["states"].keys() == ref["states"].keys()
        for n, st in res["states"].items():
            assert st.keys() == ref["states"][n].keys(), n
            for k, v in st.items():
                torch.testing.assert_close(v, ref["states"][n][k], rtol=1e-5, atol=1e-6, msg=f"{n}.{k}")


def test_dcp_round_trip_restores_freezes_and_ignores_dry_step(results):
    for r in range(2):
        res = results(f"dcp_{r}")
        assert res["restored"]["frozen"] == res["original"]["frozen"]
        assert any(v is not None for v in res["restored"]["frozen"].values())
        assert res["restored"]["step"] == res["original"]["step"]  # the loader's dry step not counted
        frozen = {n for n, s in res["restored"]["frozen"].items() if s is not None}
        for n, rg in res["restored"]["requires_grad"].items():
            assert rg == (not any(n.startswith(c + ".") for c in frozen)), n
        assert res["continued_identically"]


def test_leave_process_group_releases_live_ddp_wrappers_first(tmp_path):
    # one gloo rank in this process: the release logic without a launch (the 2-rank Trainer
    # launch in test_hf_ddp.py checks it where the hang happened)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from grades_optim.distributed import leave_process_group

    assert leave_process_group() == 0  # no group: nothing to do
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        leave_process_group(timeout_s=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        kept = DistributedDataParallel(torch.nn.Linear(3, 2))
        kept(torch.randn(4, 3)).sum().backward()
        assert "reducer" in vars(kept) and "logger" in vars(kept)
        assert leave_process_group(timeout_s=10) == 1
        assert "reducer" not in vars(kept) and "logger" not in vars(kept)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
