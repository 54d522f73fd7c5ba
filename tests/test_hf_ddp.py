"""HF Trainer's own DDP under torchrun (2 gloo ranks): GradES picks the skip mode (Trainer builds DDP
after the optimizer), both ranks freeze the same matrices at the same steps, stay identical and
stop early. Hard time limit; the launch's process group is killed on exit."""
import json

import pytest

from tests.conftest import run_isolated

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

LIMIT_S = 120


def test_trainer_ddp_ranks_agree_and_stop_early(tmp_path):
    rc, log = run_isolated(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "tests.hf_ddp_worker", str(tmp_path)], LIMIT_S, "torchrun")
    assert rc == 0, log[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["ddp"] == "DistributedDataParallel"
    assert r0["freeze_mode"] == r1["freeze_mode"] == "skip"
    assert r0["frozen"] == r1["frozen"] and all(s is not None for s in r0["frozen"].values())
    assert r0["params"] == r1["params"]  # DDP kept the replicas identical through the freezes
    assert r0["should_stop"] and r0["global_step"] < r0["max_steps"]
    # teardown: Trainer's live DDP wrapper was released before the group was destroyed
    for r in (0, 1):
        left = json.loads((tmp_path / f"rank{r}.left.json").read_text())
        assert left == {"released": 1, "reducer_kept": False, "initialized": False}
