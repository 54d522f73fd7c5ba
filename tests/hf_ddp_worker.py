"""One rank of HF Trainer + GradES under torchrun (gloo, CPU), for tests/test_hf_ddp.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.hf_ddp_worker OUT

Trainer wraps the model in DDP itself (after the optimizer exists), so GradES cannot see the DDP
object: freeze_mode="auto" must pick "skip". Each rank writes OUT/rank<R>.json.
"""
import hashlib
import json
import os
import sys
import traceback

import torch
from transformers import Trainer

from grades_optim.distributed import leave_process_group
from grades_optim.integrations.transformers import add_grades_callback, create_grades_optimizer_and_scheduler
from tests.test_integration_hf import GRADES, Data, make_args, make_model


def main(out):
    torch.set_num_threads(1)
    model = make_model("llama")
    args = make_args(os.path.join(out, "trainer"), save_strategy="no", ddp_backend="gloo",
                     per_device_train_batch_size=2)  # 2 ranks x 2 = the single-process batch of 4
    opt, sched = create_grades_optimizer_and_scheduler(model, args, **GRADES)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, sched))
    add_grades_callback(trainer)
    trainer.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    with open(os.path.join(out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"freeze_mode": opt.freeze_mode, "frozen": {c.name: c.frozen_at_step for c in opt.components},
                   "global_step": trainer.state.global_step, "max_steps": args.max_steps,
                   "should_stop": opt.should_stop, "params": digest,
                   "ddp": type(trainer.model_wrapped).__name__}, f)
    # Trainer still holds its DDP wrapper here: leave_process_group releases it before destroying
    # the group (destroyed from the wrapper later, the gloo group hung ~1 launch in 3 under load).
    rank = torch.distributed.get_rank()
    released = leave_process_group(timeout_s=60)
    with open(os.path.join(out, f"rank{rank}.left.json"), "w") as f:
        json.dump({"released": released, "reducer_kept": "reducer" in vars(trainer.model_wrapped),
                   "initialized": torch.distributed.is_initialized()}, f)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        # fail fast: the other rank gets a closed connection (and torchrun stops it) instead of
        # both ranks waiting in a teardown that needs them both
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
