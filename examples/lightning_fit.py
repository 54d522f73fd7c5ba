"""GradES with PyTorch Lightning: ``configure_optimizers`` returns the wrapper, a callback does the rest.

A tiny random-init Llama (built from a config, nothing downloaded) learns to continue counting
sequences. Lightning drives the wrapper through its closure-based ``optimizer.step(closure)`` with
bf16 autocast, gradient accumulation and clipping; ``GradESCallback`` logs ``grades/*`` through
``self.log`` (here to a CSV logger), and stops the fit once every projection matrix is frozen.
Runs on CPU in a few seconds:

    python examples/lightning_fit.py [--out DIR]
"""
import argparse
import logging
import tempfile
import warnings

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import LlamaConfig, LlamaForCausalLM

from grades_optim.integrations.lightning import GradESCallback, grades_optimizer


class CountingLM(L.LightningModule):
    def __init__(self, vocab=32, lr=1e-2, tau=0.5):
        super().__init__()
        self.model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  vocab_size=vocab, max_position_embeddings=64))
        self.lr, self.tau = lr, tau

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # total_steps comes from trainer.estimated_stepping_batches; alpha=0.2 is the grace period.
        opt = grades_optimizer(self, torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0),
                               tau=self.tau, tau_mode="relative", alpha=0.2)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))  # on the wrapper
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def counting_loader(n, seq_len, vocab, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq_len)) % vocab
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size, shuffle=True,
                                       generator=g)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="log/checkpoint folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=30, help="max_steps (optimizer steps)")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    L.seed_everything(0, verbose=False)
    out = args.out or tempfile.mkdtemp(prefix="grades_lightning_")
    grades = GradESCallback(prog_bar=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, precision="bf16-mixed",
                        accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=[grades],
                        logger=CSVLogger(out, name="grades"), log_every_n_steps=5, default_root_dir=out,
                        enable_progress_bar=False, enable_model_summary=False)
    module = CountingLM()
    trainer.fit(module, counting_loader(512, 16, 32, 8))

    opt = trainer.optimizers[0]
    s = opt.summary()
    figures = {k: f"{float(v):.3g}" for k, v in trainer.callback_metrics.items() if k.startswith("grades/")}
    print(f"frozen {s['frozen']}/{s['tracked']}; fit stopped at step {trainer.global_step} of {args.steps}"
          + (" (GradES early stop)" if grades.stopped_at_step is not None else ""))
    print(f"last logged GradES figures: {figures}")
    print(f"metrics CSV and checkpoints under {out}; Trainer.fit(ckpt_path=...) restores the freeze set")


if __name__ == "__main__":
    main()
