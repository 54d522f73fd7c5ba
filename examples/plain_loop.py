"""GradES in a plain PyTorch loop: accumulation, bf16 autocast, clipping, an LR schedule, early stop.

A tiny random-init Llama (built from a config, nothing downloaded) learns to continue counting
sequences ("5 6 7 8 …" modulo the vocabulary). As it learns, each projection matrix's gradient
shrinks; GradES freezes every matrix whose gradient has fallen below ``tau`` × its level during the
grace period, and the loop ends once all are frozen. Runs on CPU in a few seconds:

    python examples/plain_loop.py
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grades_optim import GradESOptimizer


def counting_batches(n_batches, batch_size, seq_len, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        start = torch.randint(0, vocab, (batch_size, 1), generator=g)
        yield (start + torch.arange(seq_len)) % vocab


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="planned optimizer steps")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--tau", type=float, default=0.5,
                        help="relative threshold (fraction of the grace-period level)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    vocab = 32
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=64))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = GradESOptimizer(inner, model=model, tau=args.tau, tau_mode="relative",
                          alpha=0.2, total_steps=args.steps)  # grace: the first 20% of the steps
    # Schedulers take the wrapper: its param_groups are the inner optimizer's.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / args.steps))
    print(f"tracking {len(opt.components)} projection matrices, grace period {opt.grace_steps} steps")

    t0 = time.perf_counter()
    batches = counting_batches(args.steps * args.accum, 8, 16, vocab, args.seed)
    for i, ids in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss / args.accum  # a mean over micro-batches
        loss.backward()
        if (i + 1) % args.accum:
            continue  # accumulate: GradES only sees (and counts) real optimizer steps
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # GradES measures the clipped gradient
        opt.step()
        sched.step()
        opt.zero_grad()
        s = opt.summary()
        if s["step"] % 10 == 0 or opt.should_stop:
            print(f"step {s['step']:3d}  loss {loss.item() * args.accum:.3f}  frozen {s['frozen']}/{s['tracked']}")
        if opt.should_stop:  # every matrix frozen: GradES early stop
            print(f"GradES stopped training at step {opt.step_count} of {args.steps}")
            break
    s = opt.summary()
    print(f"done in {time.perf_counter() - t0:.1f}s: {s['frozen']}/{s['tracked']} frozen, "
          f"{s['released_state_bytes']} bytes of optimizer state released")
    for comp in opt.components:
        print(f"  {comp.name:40s} {comp.kind:9s} frozen at step {comp.frozen_at_step}")


if __name__ == "__main__":
    main()
