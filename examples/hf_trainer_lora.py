"""GradES with the Hugging Face Trainer and a PEFT LoRA model.

A tiny random-init Llama (built from a config, nothing downloaded) gets LoRA adapters on every
projection (and a trainable copy of its LM head); Trainer trains them to continue counting
sequences. GradES treats each
adapted matrix (its lora_A and lora_B together) as one component, freezes each one whose gradient
fell below ``tau`` × its grace-period level, and ``GradESCallback`` stops Trainer once all are
frozen. The ``grades_*`` figures appear in every log line. Runs on CPU in a few seconds:

    python examples/hf_trainer_lora.py [--out DIR]
"""
import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from grades_optim.integrations.transformers import add_grades_callback, create_grades_optimizer_and_scheduler


class Counting(torch.utils.data.Dataset):
    """Sequences "k k+1 k+2 …" modulo the vocabulary; the labels are the inputs (causal LM)."""

    def __init__(self, n, seq_len, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(seq_len)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=40, help="max_steps for Trainer")
    parser.add_argument("--tau", type=float, default=0.5, help="relative threshold")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    vocab = 32
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=64))
    # The head is trained in full (modules_to_save): it is not a projection matrix, so GradES
    # never freezes it; it trains until GradES stops the run.
    model = get_peft_model(base, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=["lm_head"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

    out = args.out or tempfile.mkdtemp(prefix="grades_hf_lora_")
    targs = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=args.steps,
                              per_device_train_batch_size=8, gradient_accumulation_steps=2,
                              learning_rate=2e-2, max_grad_norm=1.0, logging_steps=5,
                              save_strategy="steps", save_steps=20, disable_tqdm=True, seed=0)
    # The inner optimizer and LR schedule exactly as Trainer would build them from targs,
    # wrapped in GradES. alpha=0.2: nothing freezes during the first 20% of the steps.
    opt, sched = create_grades_optimizer_and_scheduler(model, targs, tau=args.tau, tau_mode="relative", alpha=0.2)
    trainer = Trainer(model=model, args=targs, train_dataset=Counting(512, 16, vocab, 0), optimizers=(opt, sched))
    callback = add_grades_callback(trainer)  # first in the list, so every reporter sees grades_*
    trainer.train()

    s = opt.summary()
    print(f"tracked {s['tracked']} LoRA-adapted matrices, e.g. {opt.components[0].name}: "
          f"{', '.join(opt.components[0].param_names)}")
    print(f"frozen {s['frozen']}/{s['tracked']}; Trainer stopped at step {trainer.state.global_step} of "
          f"{args.steps}" + (" (GradES early stop)" if callback.stopped_at_step else ""))
    print(f"checkpoints in {out}: resume with trainer.train(resume_from_checkpoint=...) and the freeze "
          "set comes back with optimizer.pt")


if __name__ == "__main__":
    main()
