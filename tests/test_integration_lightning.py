"""GradES inside Lightning ``fit``: closure steps, logging, early stop, checkpoint resume; CPU.

The model is the hand-built Llama-shaped ``TinyLM`` of conftest (no transformers needed). As in
test_integration_hf, ``metric="weight_delta_l1"`` with ``tau_mode="relative"`` under Adam and a
linearly decaying learning rate makes freezing staggered and certain to finish before
``MAX_STEPS``: the first Adam update of an element is ``lr·sign(g)`` and later ones are at most
about ``lr``, so the ratio falls below ``TAU`` once the LR has fallen below ``TAU·lr0``.
"""
import pytest

L = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from grades_optim import GradESOptimizer  # noqa: E402
from grades_optim.integrations.lightning import GradESCallback, grades_optimizer  # noqa: E402
from tests.conftest import make_model  # noqa: E402

V, T, N_SAMPLES, BATCH = 32, 6, 12, 4
STEPS_PER_EPOCH = N_SAMPLES // BATCH  # 3
MAX_STEPS, TAU = 8, 0.4
GRADES = dict(tau=TAU, tau_mode="relative", metric="weight_delta_l1")
FIGURES = ("grades/frozen", "grades/tracked", "grades/frozen_ratio", "grades/step", "grades/mag_attention")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Lit(L.LightningModule):
    def __init__(self, grades=None, lr=1e-2):
        super().__init__()
        self.net = make_model(seed=0, vocab=V, d=8)
        self.grades = dict(GRADES if grades is None else grades)
        self.lr = lr
        self.steps_seen = []  # GradES step counter after each optimizer step (via a step hook)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.net.loss(ids)

    def configure_optimizers(self):
        opt = grades_optimizer(self, torch.optim.Adam(self.parameters(), lr=self.lr), **self.grades)
        opt.register_step_post_hook(lambda o, args, kw: self.steps_seen.append(o.step_count))
        total = self.trainer.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MemoryLogger(Logger):
    """Collects every ``log_metrics`` call (what a real logger would write)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class Watch(L.Callback):
    """Test probe: freeze set per step, state at train start, a copy of each matrix once frozen."""

    def __init__(self):
        self.frozen_by_step, self.snap, self.begin = {}, {}, None

    @staticmethod
    def opt(trainer):
        return GradESCallback.grades_optimizers(trainer)[0]

    def on_train_start(self, trainer, pl_module):
        opt = self.opt(trainer)
        self.begin = (trainer.global_step, opt.step_count, frozenset(c.name for c in opt.components if c.frozen))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = self.opt(trainer)
        self.frozen_by_step[trainer.global_step] = frozenset(c.name for c in opt.components if c.frozen)
        for comp in opt.components:
            if comp.frozen and comp.name not in self.snap:
                self.snap[comp.name] = [opt.param_groups[g]["params"][i].detach().clone() for g, i in comp.positions]

    def assert_frozen_unchanged(self, opt):
        by_name = {c.name: c for c in opt.components}
        for name, before in self.snap.items():
            now = [opt.param_groups[g]["params"][i] for g, i in by_name[name].positions]
            for a, b in zip(before, now):
                assert torch.equal(a, b), f"{name} changed after it froze"


def loader():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (N_SAMPLES, T), generator=g)
    # shuffle=False: a resumed fit sees the same batches without restoring sampler state
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=BATCH, shuffle=False)


def fit(tmp, *, ckpt_path=None, module=None, checkpoints=True, **trainer_kw):
    module = module or Lit()
    watch, cb, log = Watch(), GradESCallback(), MemoryLogger()
    callbacks = [cb, watch]
    if checkpoints:  # one checkpoint per epoch, i.e. every STEPS_PER_EPOCH steps
        callbacks.append(ModelCheckpoint(dirpath=str(tmp), every_n_epochs=1, save_top_k=-1,
                                         filename="{epoch}-{step}"))
    kw = dict(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=log, log_every_n_steps=1,
              callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=checkpoints, num_sanity_val_steps=0, deterministic=True)
    kw.update(trainer_kw)
    trainer = L.Trainer(**kw)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module, watch, cb, log


def test_fit_freezes_logs_stops_and_resumes_identically(tmp_path):
    trainer, module, watch, cb, log = fit(tmp_path / "a")
    opt = trainer.optimizers[0]
    assert isinstance(opt, GradESOptimizer)
    # components found (2 layers × q,k,v,o,gate,up,down)
    assert len(opt.components) == 14 and {c.kind for c in opt.components} == {"attention", "mlp"}
    assert opt.total_steps == MAX_STEPS
    # freezes happened, all before max_steps: GradES stopped the fit
    stop = trainer.global_step
    assert opt.should_stop and stop < MAX_STEPS and cb.stopped_at_step == stop
    assert 0 < len(watch.frozen_by_step[STEPS_PER_EPOCH]) < len(opt.components)  # staggered
    assert module.steps_seen == list(range(1, stop + 1))  # one GradES step per closure-driven step
    watch.assert_frozen_unchanged(opt)
    # logged through pl_module.log: every logger row of a training step carries the figures
    rows = [m for _, m in log.rows if "grades/frozen" in m]
    assert len(rows) == stop and all(all(k in m for k in FIGURES) for m in rows)
    assert rows[0]["grades/frozen"] == 0 and rows[-1]["grades/frozen_ratio"] == 1.0
    assert trainer.callback_metrics["grades/frozen"] == len(opt.components)

    # resume from the end-of-epoch-1 checkpoint: the freeze set comes back with the optimizer state
    at = STEPS_PER_EPOCH
    assert watch.frozen_by_step[at], "nothing frozen at the checkpoint: the resume would not test it"
    ckpt = tmp_path / "a" / f"epoch=0-step={at}.ckpt"
    assert ckpt.is_file()
    trainer_b, module_b, watch_b, _, _ = fit(tmp_path / "b", ckpt_path=str(ckpt))
    opt_b = trainer_b.optimizers[0]
    assert watch_b.begin == (at, at, watch.frozen_by_step[at])
    assert trainer_b.global_step == stop
    assert [c.frozen_at_step for c in opt_b.components] == [c.frozen_at_step for c in opt.components]
    for (n, a), (_, b) in zip(module.named_parameters(), module_b.named_parameters()):
        assert torch.equal(a, b), n
    watch_b.assert_frozen_unchanged(opt_b)


def test_bf16_autocast_accumulation_and_clipping(tmp_path):
    """bf16-mixed on CPU, 2 micro-batches per step, clipping inside Lightning's closure."""
    module = Lit(grades={**GRADES, "alpha": 0.25})
    trainer, module, watch, cb, log = fit(tmp_path, module=module, precision="bf16-mixed",
                                          accumulate_grad_batches=2, gradient_clip_val=0.5, checkpoints=False)
    opt = trainer.optimizers[0]
    assert type(trainer.precision_plugin).__name__ == "MixedPrecision"
    stop = trainer.global_step
    assert opt.grace_steps == 2 and opt.total_steps == MAX_STEPS
    assert module.steps_seen == list(range(1, stop + 1))  # optimizer steps, not micro-batches
    assert min(c.frozen_at_step for c in opt.components) > 2 and opt.should_stop and stop < MAX_STEPS
    assert all(p.dtype == torch.float32 for p in module.parameters())
    watch.assert_frozen_unchanged(opt)


def test_callback_refuses_a_plain_optimizer(tmp_path):
    class Plain(Lit):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="no GradESOptimizer"):
        fit(tmp_path, module=Plain(), checkpoints=False)


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="pl_module"):
        grades_optimizer(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), tau=1.0)
    with pytest.raises(TypeError, match="prefix"):
        GradESCallback(prefix=3)


def test_resuming_a_fit_gradES_already_ended_takes_no_step(tmp_path):
    trainer, module, _, _, _ = fit(tmp_path / "a")
    stop = trainer.global_step
    last = sorted((tmp_path / "a").glob(f"*step={stop}.ckpt"))
    assert last, "the epoch-end checkpoint after the GradES stop is missing"
    trainer_b, module_b, _, cb_b, _ = fit(tmp_path / "b", ckpt_path=str(last[0]))
    assert trainer_b.global_step == stop and cb_b.stopped_at_step == stop
    assert module_b.steps_seen == []
    for (n, a), (_, b) in zip(module.named_parameters(), module_b.named_parameters()):
        assert torch.equal(a, b), n
