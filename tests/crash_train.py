"""A plain GradES training loop with crash-safe checkpoints, driven by tests/test_crash_resume.py.

    python -m tests.crash_train RUN_DIR [--pause-in-write-at STEP]

Resumes from RUN_DIR/ckpt if a checkpoint exists, prints ``STEP k`` after each step (flushed) and
writes RUN_DIR/final.pt at the end. ``--pause-in-write-at`` makes the checkpoint write of that step
stop halfway (after writing part of the temporary file) so the test can kill it mid-write.
"""
import argparse
import os
import sys
import time

import torch

import grades_optim.checkpoint as ckpt
from grades_optim import GradESOptimizer
from tests.conftest import batch, make_model, pause_mid_write

TOTAL, EVERY = 40, 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--pause-in-write-at", type=int, default=None)
    ap.add_argument("--step-delay", type=float, default=0.0, help="seconds per step, so kills land mid-run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.pause_in_write_at is not None:
        real_write = ckpt.write_atomic

        def slow_write(path, data):
            if path.name == f"ckpt-{args.pause_in_write_at:09d}.pt":
                pause_mid_write(path, data, 60)
            real_write(path, data)

        ckpt.write_atomic = slow_write
    model = make_model(seed=7)
    opt = GradESOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05), model=model,
                          tau=0.8, tau_mode="relative", grace_steps=4, patience=2, ema=0.2, metric="grad_delta_l1")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    ckpt_dir = os.path.join(args.run_dir, "ckpt")
    state = ckpt.load_checkpoint(ckpt_dir, model=model, optimizer=opt, scheduler=sched)
    start = 0 if state is None else state["step"]
    for step in range(start, TOTAL):
        opt.zero_grad()
        ids = batch(step % 6)
        noise = torch.randn(()) * 1e-3  # consumes the RNG: resume must restore it exactly
        (model.loss(ids) + noise * 0).backward()
        opt.step()
        sched.step()
        print(f"STEP {step + 1}", flush=True)
        time.sleep(args.step_delay)
        if (step + 1) % EVERY == 0:
            ckpt.save_checkpoint(ckpt_dir, step + 1, model=model, optimizer=opt, scheduler=sched,
                                 extra={"noise": float(noise)})
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()},
                "frozen": [c.frozen_at_step for c in opt.components],
                "history": [tuple(r) for r in opt.history], "rng": torch.get_rng_state()},
               os.path.join(args.run_dir, "final.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
