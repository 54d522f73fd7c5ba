"""Two-process (gloo, CPU) scenarios for tests/test_distributed.py.

Run as ``python -m tests.dist_worker OUT_DIR``: computes single-process references, then spawns 2
ranks that run every scenario in one process group (spawning costs seconds of imports) and
write their results under OUT_DIR with torch.save.
"""
import datetime
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import: the fused FSDP2 scenario runs on CPU

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grades_optim import GradESOptimizer
from grades_optim.distributed import leave_process_group
from tests.conftest import batch, make_model

STEPS = 6
GLOBAL = 8  # sequences per step, split evenly over the ranks


def attention_converged(model):
    """Make every attention gradient tiny (after DDP/FSDP synchronised them): a freeze far from any
    threshold, so fp32 reduction-order noise cannot flip a decision."""
    for name, p in model.named_parameters():
        if "self_attn" in name and p.grad is not None:
            p.grad.mul_(1e-6)


def ids_for(step, rank=None, world=2):
    ids = batch(step, n=GLOBAL)
    if rank is None:
        return ids
    per = GLOBAL // world
    return ids[rank * per:(rank + 1) * per]


def loss_of(logits, ids):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, forward_model, opt, rank=None, steps=STEPS, perturb=None, converge_from=0):
    for s in range(steps):
        opt.zero_grad()
        ids = ids_for(s, rank)
        loss_of(forward_model(ids[:, :-1]), ids).backward()
        if s >= converge_from:
            attention_converged(model)
        if perturb is not None:
            perturb(model)
        opt.step()


def freeze_steps(opt):
    return {c.name: c.frozen_at_step for c in opt.components}


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def make_opt(model, params=None, **kw):
    inner = torch.optim.AdamW(params if params is not None else model.parameters(), lr=1e-2)
    return GradESOptimizer(inner, model=model, tau=1e-5, grace_steps=2, **kw)


def rescaled_steps(model, opt, n=3):
    """n more steps on the last gradients, halved in place each time: the gradient tensors (and so
    their addresses) stay the same from step to step, as the caching allocator gives on a GPU."""
    for _ in range(n):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)
        opt.step()


def reference(out):
    model = make_model()
    opt = make_opt(model)
    train(model, model, opt)
    torch.save({"params": full_params(model), "frozen": freeze_steps(opt)}, os.path.join(out, "reference.pt"))
    rescaled_steps(model, opt)
    states = {n: dict(opt.state[p]) for n, p in model.named_parameters() if p in opt.state}
    torch.save({"params": full_params(model), "frozen": freeze_steps(opt), "states": states},
               os.path.join(out, "reference_rescaled.pt"))


def scenario_ddp(rank, out, find_unused):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model, find_unused_parameters=find_unused)
    opt = make_opt(ddp, params=ddp.parameters())
    train(model, ddp, opt, rank)
    torch.save({"params": full_params(model), "frozen": freeze_steps(opt), "mode": opt.freeze_mode,
                "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}},
               os.path.join(out, f"ddp_{int(find_unused)}_{rank}.pt"))


def scenario_perturbed(rank, out):
    """No DDP: each rank measures different local gradients; decisions must still agree."""
    model = make_model()
    opt = GradESOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), model=model, tau=0.02,
                          tau_mode="relative", grace_steps=1, patience=1, freeze_mode="skip")
    scale = 0.2 if rank == 0 else 5.0

    def perturb(m):
        for i, layer in enumerate(m.model.layers):
            for p in layer.parameters():
                p.grad.mul_(scale if i == 0 else 1.0)

    train(model, model, opt, rank, steps=8, perturb=perturb, converge_from=3)
    torch.save({"frozen": freeze_steps(opt), "history": [tuple(r) for r in opt.history]},
               os.path.join(out, f"perturbed_{rank}.pt"))


def scenario_fsdp2(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))  # explicit CPU mesh: the default is CUDA on GPU hosts
    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(model)
    train(model, model, opt, rank)
    torch.save({"params": full_params(model), "frozen": freeze_steps(opt), "mode": opt.freeze_mode},
               os.path.join(out, f"fsdp2_{rank}.pt"))


def scenario_fsdp2_fused(rank, out):
    """FSDP2 on the fused path: the kernel steps each rank's local shards (impl='triton', interpreted)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    from grades_optim.kernels import fused_adamw

    opt = make_opt(model, impl="triton")
    train(model, model, opt, rank)
    calls, real = [], fused_adamw.PreparedAdamW.step
    fused_adamw.PreparedAdamW.step = lambda self, **k: calls.append(1) or real(self, **k)
    try:
        rescaled_steps(model, opt)
    finally:
        fused_adamw.PreparedAdamW.step = real
    states = {n: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in opt.state[p].items()}
              for n, p in model.named_parameters() if p in opt.state}
    hot = opt._fused._hot  # the prepared steady state, on the shards
    torch.save({"params": full_params(model), "frozen": freeze_steps(opt), "fast_path": opt.fast_path,
                "reason": opt.fast_path_reason, "states": states,
                "prepared_on_shards": hot is not None and hot.local is not None and len(calls) > 0},
               os.path.join(out, f"fsdp2_fused_{rank}.pt"))


def scenario_dcp(rank, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_model()
    opt = make_opt(model, freeze_mode="requires_grad")
    train(model, model, opt, None, steps=4)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(out, "dcp"))
    fresh = make_model()
    fresh.load_state_dict(model.state_dict())
    fresh_opt = make_opt(fresh, freeze_mode="requires_grad")
    template = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}  # runs DCP's dry init step
    # Frozen params were saved with only `step`; the fresh template still has moments for them.
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
    dcp.load(template, checkpoint_id=os.path.join(out, "dcp"), planner=planner)
    set_optimizer_state_dict(fresh, fresh_opt, template["optim"])
    restored = {"frozen": freeze_steps(fresh_opt), "step": fresh_opt.step_count,
                "requires_grad": {n: p.requires_grad for n, p in fresh.named_parameters()}}
    for s in range(4, 7):  # both continue identically
        for m, o in ((model, opt), (fresh, fresh_opt)):
            o.zero_grad()
            ids = ids_for(s)
            loss_of(m(ids[:, :-1]), ids).backward()
            attention_converged(m)
            o.step()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    torch.save({"original": {"frozen": freeze_steps(opt), "step": 4}, "restored": restored,
                "continued_identically": same}, os.path.join(out, f"dcp_{rank}.pt"))


def worker(rank, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # 2 ranks on 2 cores: do not oversubscribe
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        scenario_ddp(rank, out, find_unused=True)
        scenario_ddp(rank, out, find_unused=False)
        scenario_perturbed(rank, out)
        scenario_fsdp2(rank, out)
        scenario_fsdp2_fused(rank, out)
        scenario_dcp(rank, out)
    except BaseException:
        leave_process_group(wait_for_ranks=False)
        raise
    leave_process_group(timeout_s=60)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    reference(out_dir)
    mp.spawn(worker, args=(out_dir,), nprocs=2, join=True)
