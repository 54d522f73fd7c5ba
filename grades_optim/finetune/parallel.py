"""``grades-optim finetune`` under ``torchrun`` (CPU, gloo): DDP with the single-process global batch.

* detected from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); with
  ``WORLD_SIZE=1`` (or outside torchrun) the job runs as a single process;
* each step's global batch of ``--batch-size`` examples is split evenly over the ranks (contiguous
  slices; the size must be divisible by the number of ranks). DDP averages the gradients, so the
  update is the single-process one up to floating-point reduction order;
* the model is wrapped in DDP with ``find_unused_parameters=True`` so GradES (given the DDP model)
  picks ``freeze_mode="requires_grad"``: frozen matrices stop computing weight gradients;
* evaluation (probes, classic-es validation, test) is sharded over the ranks and the sums are
  all-reduced, so every rank sees the same accuracy and loss and classic-es stops everywhere at once;
  the reported training loss is the mean over ranks;
* rank 0 alone writes the report, the work folder and its checkpoints and prints the table;
  every rank reads them, so ``--resume`` continues a killed torchrun run. A checkpoint carries
  every rank's RNG state (each rank restores its own: nothing guarantees the ranks consume their
  dropout streams alike, since their shards pad to their own lengths), and the work folder
  records the number of ranks, so a run resumes only with the same ``--nproc_per_node``;
* the process group is destroyed on the way out, errors included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from typing import Iterator, Optional

import torch

from ..distributed import leave_process_group
from .errors import FinetuneError

__all__ = ["Parallel", "from_env", "launched"]

logger = logging.getLogger("grades_optim.finetune")


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise FinetuneError(f"torchrun environment: {name}={value!r} is not an integer") from None


def from_env() -> Optional[tuple[int, int, int]]:
    """``(rank, world_size, local_world_size)`` when launched by torchrun with several ranks."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    rank = _env_int("RANK")
    if rank is None or _env_int("LOCAL_RANK") is None:
        raise FinetuneError("WORLD_SIZE is set but RANK/LOCAL_RANK are not: launch with torchrun "
                            "(torchrun --nproc_per_node=N -m grades_optim finetune ...)")
    return rank, world, _env_int("LOCAL_WORLD_SIZE") or world


@dataclasses.dataclass
class Parallel:
    rank: int
    world: int
    local_world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters lets DDP's reducer tolerate matrices whose requires_grad GradES
        # turns off; GradES detects it from the wrapper and uses freeze_mode="requires_grad".
        return DDP(model, find_unused_parameters=True)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise FinetuneError(f"--batch-size {batch_size} is not divisible by the {self.world} torchrun "
                                "processes; each step's batch is split evenly over them")

    def shard(self, index: list) -> list:
        per = len(index) // self.world
        return index[self.rank * per:(self.rank + 1) * per]

    def span(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)`` (sizes differ by at most one)."""
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return range(lo, hi)

    def all_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (a collective: all ranks must call it)."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, model: torch.nn.Module, extra: str) -> bool:
        """Whether every rank holds bit-identical parameters and the same ``extra`` summary."""
        import torch.distributed as dist

        h = hashlib.sha256(extra.encode())
        for name, p in model.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = [None] * self.world
        dist.all_gather_object(digests, h.hexdigest())
        return len(set(digests)) == 1


@contextlib.contextmanager
def launched() -> Iterator[Optional[Parallel]]:
    """Join torchrun's gloo process group for the duration (None when not under torchrun)."""
    found = from_env()
    if found is None:
        yield None
        return
    import torch.distributed as dist

    rank, world, local_world = found
    dist.init_process_group("gloo")
    try:
        logger.info("torchrun: %d ranks (gloo, CPU); rank 0 writes the report", world)
        yield Parallel(rank, world, local_world)
    except BaseException:
        # the other ranks may be blocked in a collective this one never joins: do not wait for them
        leave_process_group(wait_for_ranks=False)
        raise
    # leave together: no rank tears its connections down while rank 0 still writes the report
    leave_process_group()
