"""Run ``grades-optim finetune`` with test-only instrumentation, for tests/test_finetune_resume.py.

    python -m tests.finetune_crash_driver FINAL_DIR [--step-delay S] [--pause-write METHOD/FILE] -- ARGS...

Nothing here is in the library: the instrumentation is monkeypatched in before ``cli.main(ARGS)``.

* prints ``STEP <method> <k>`` (flushed) before training step k, then sleeps ``--step-delay`` so a
  SIGKILL sent on that line lands mid-run;
* prints ``SAVED <method>/<file>`` after each atomic checkpoint write; with ``--pause-write
  grades/ckpt-000000020.pt`` that write stops halfway through its temporary file, prints
  ``WRITING`` and sleeps, so the test can kill it mid-write (as tests/crash_train.py does);
* saves each method's final parameters to ``FINAL_DIR/<method>.pt`` when it finishes training
  (under torchrun to ``FINAL_DIR/rank<R>/<method>.pt``: the ranks must not share a file).
"""
import argparse
import os
import sys
import time

import torch

import grades_optim.checkpoint as ckpt
from grades_optim import cli
from grades_optim.finetune import parallel, runner, train
from tests.conftest import pause_mid_write


def instrument(final_dir: str, step_delay: float, pause_write: str) -> None:
    current = {"method": None}
    steps: dict = {}  # id(batch index list) -> step number, for the training order only

    real_order = train.Batches.order

    def order(self, total, batch_size, seed):
        out = real_order(self, total, batch_size, seed)
        steps.clear()
        steps.update({id(ix): k for k, ix in enumerate(out, 1)})
        return out

    real_batch = train.Batches.batch

    def batch(self, index):
        k = steps.get(id(index))
        if k is not None:
            print(f"STEP {current['method']} {k}", flush=True)
            time.sleep(step_delay)
        return real_batch(self, index)

    real_shard = parallel.Parallel.shard

    def shard(self, index):  # under torchrun each rank trains on a slice: keep its step number
        out = real_shard(self, index)
        if id(index) in steps:
            steps[id(out)] = steps[id(index)]
        return out

    real_train = runner.train_method

    def train_method(method, model, *args, **kwargs):
        current["method"] = method
        result = real_train(method, model, *args, **kwargs)
        path = os.path.join(final_dir, f"{method}.pt")
        torch.save({n: p.detach().clone() for n, p in model.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        return result

    real_write = ckpt.write_atomic

    def write_atomic(path, data):
        name = f"{path.parent.name}/{path.name}"
        if name == pause_write:
            pause_mid_write(path, data, 120)
        real_write(path, data)
        print(f"SAVED {name}", flush=True)

    train.Batches.order = order
    train.Batches.batch = batch
    parallel.Parallel.shard = shard
    runner.train_method = train_method
    ckpt.write_atomic = write_atomic


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("final_dir")
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--pause-write", default="")
    split = sys.argv.index("--")
    ns = ap.parse_args(sys.argv[1:split])
    argv = sys.argv[split + 1:]
    final_dir = ns.final_dir if "RANK" not in os.environ else os.path.join(ns.final_dir, f"rank{os.environ['RANK']}")
    os.makedirs(final_dir, exist_ok=True)
    instrument(final_dir, ns.step_delay, ns.pause_write)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
