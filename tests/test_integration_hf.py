"""GradES inside the Hugging Face Trainer (accelerate, PEFT LoRA, bf16, accumulation, resume); CPU.

Every model is a tiny random-init one built from a config (no hub). To make freezes happen within
a few steps *deterministically*, most runs use ``metric="weight_delta_l1"`` with
``tau_mode="relative"``: under Adam the first update of every element is ``lr·sign(g)``, later
ones are at most about ``lr``, and Trainer's linear schedule decays ``lr`` to 0 over
``max_steps``. The ratio "update now / first update" therefore falls below ``TAU`` by the time the
learning rate has fallen to ``TAU·lr0`` at the latest (step 7 of 8 for 0.4), earlier for most
matrices, so freezing is staggered and always complete before the end: the run stops early.
"""
import math
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from grades_optim import GradESOptimizer  # noqa: E402
from grades_optim.integrations.transformers import (  # noqa: E402
    GradESCallback,
    GradESOptimizerFactory,
    add_grades_callback,
    create_grades_optimizer,
    create_grades_optimizer_and_scheduler,
    find_grades_optimizer,
)

transformers.logging.set_verbosity_error()

V, T, N_SAMPLES, BATCH = 64, 8, 16, 4
MAX_STEPS, SAVE_AT, TAU = 8, 3, 0.4
GRADES = dict(tau=TAU, tau_mode="relative", metric="weight_delta_l1")
FIGURES = ("grades_frozen", "grades_tracked", "grades_frozen_ratio", "grades_step")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=V, max_position_embeddings=32))


MODELS = {
    "llama": _llama,
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=V, max_position_embeddings=32)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=V, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)),
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        vocab_size=V, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        vocab_size=V, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
}
# Projection matrices per model: layers × (q,k,v,o + MLP), fused ones counting once.
EXPECTED_COMPONENTS = {"llama": 14, "qwen3": 14, "gpt2": 8, "bert": 12, "t5": 16, "phi3": 8}


class Data(torch.utils.data.Dataset):
    """Random token sequences; labels = the tokens (LM, seq2seq) or a random class (BERT)."""

    def __init__(self, classification=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(1, V, (N_SAMPLES, T), generator=g)
        self.y = torch.randint(0, 2, (N_SAMPLES,), generator=g)
        self.classification = classification

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i] if self.classification else self.x[i]}


def make_model(arch, lora=False):
    torch.manual_seed(0)
    model = MODELS[arch]()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=2, lora_alpha=4, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model


def make_args(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="steps",
                save_steps=SAVE_AT, logging_steps=1, disable_tqdm=True, max_steps=MAX_STEPS,
                per_device_train_batch_size=BATCH, learning_rate=1e-2, weight_decay=0.0, seed=0,
                save_only_model=False, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def tensors(opt, comp):
    return [opt.param_groups[g]["params"][i] for g, i in comp.positions]


class Watch(TrainerCallback):
    """Test probe: the freeze set per step, the state at train begin, and a copy of each matrix
    taken right after the step that froze it (to check it never changes afterwards)."""

    def __init__(self):
        self.frozen_by_step, self.snap, self.begin, self.logs = {}, {}, None, []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        opt = find_grades_optimizer(optimizer)
        self.begin = (state.global_step, opt.step_count, frozenset(c.name for c in opt.components if c.frozen))

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        opt = find_grades_optimizer(optimizer)
        self.frozen_by_step[state.global_step] = frozenset(c.name for c in opt.components if c.frozen)
        for comp in opt.components:
            if comp.frozen and comp.name not in self.snap:
                self.snap[comp.name] = [t.detach().clone() for t in tensors(opt, comp)]

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))

    def assert_frozen_unchanged(self, opt):
        by_name = {c.name: c for c in opt.components}
        for name, before in self.snap.items():
            for a, b in zip(before, tensors(opt, by_name[name])):
                assert torch.equal(a, b), f"{name} changed after it froze"


def train(arch, out, *, lora=False, resume=None, args_kw=None, grades=None, classification=None):
    model = make_model(arch, lora)
    args = make_args(out, **(args_kw or {}))
    opt, sched = create_grades_optimizer_and_scheduler(model, args, **(grades or GRADES))
    watch = Watch()
    data = Data(classification=arch == "bert" if classification is None else classification)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched), callbacks=[watch])
    cb = add_grades_callback(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, opt, watch, cb


def final_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_run(trainer, opt, watch, cb, expected_components):
    # components found
    assert len(opt.components) == expected_components
    assert {c.kind for c in opt.components} == {"attention", "mlp"}
    # accelerate wrapped our optimizer; the callback unwrapped it
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer" and trainer.optimizer.optimizer is opt
    # freezes happened, staggered, all before max_steps: GradES stopped training early
    stop = trainer.state.global_step
    assert opt.should_stop and all(c.frozen for c in opt.components)
    assert stop < MAX_STEPS and cb.stopped_at_step == stop
    assert opt.step_count == stop
    watch.assert_frozen_unchanged(opt)
    # the stop saved a final checkpoint, as Trainer does at a normal end
    assert os.path.isdir(os.path.join(trainer.args.output_dir, f"checkpoint-{stop}"))
    # every training log carries the figures (the probe runs after GradESCallback); so does history
    train_logs = [lg for lg in watch.logs if "loss" in lg]
    assert len(train_logs) == stop
    for lg in train_logs + [h for h in trainer.state.log_history if "loss" in h]:
        assert all(k in lg for k in FIGURES) and "grades_mag_attention" in lg
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["grades_frozen"] == expected_components and last["grades_frozen_ratio"] == 1.0
    first = train_logs[0]
    assert first["grades_frozen"] == 0 and math.isfinite(first["grades_mag_mlp"]) and first["grades_mag_mlp"] > 0


def check_resume(arch, tmp_path, lora=False, expected=None, save_at=SAVE_AT, grades=None):
    args_kw = {"save_steps": save_at}
    trainer, opt, watch, cb = train(arch, tmp_path / "a", lora=lora, args_kw=args_kw, grades=grades)
    check_run(trainer, opt, watch, cb, expected)
    ckpt = tmp_path / "a" / f"checkpoint-{save_at}"
    assert ckpt.is_dir()
    at_save = watch.frozen_by_step[save_at]
    assert at_save, "nothing frozen at the checkpoint: the resume would not test the freeze set"
    assert len(at_save) < len(opt.components) or trainer.state.global_step == save_at

    trainer_b, opt_b, watch_b, _ = train(arch, tmp_path / "b", lora=lora, resume=str(ckpt),
                                         args_kw=args_kw, grades=grades)
    # the freeze set and the GradES counter came back with optimizer.pt, before the first step
    assert watch_b.begin == (save_at, save_at, at_save)
    # ...and training continued identically
    assert trainer_b.state.global_step == trainer.state.global_step
    assert [c.frozen_at_step for c in opt_b.components] == [c.frozen_at_step for c in opt.components]
    a, b = final_params(trainer.model), final_params(trainer_b.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    watch_b.assert_frozen_unchanged(opt_b)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_trainer_freezes_stops_logs_and_resumes(arch, tmp_path):
    check_resume(arch, tmp_path, expected=EXPECTED_COMPONENTS[arch])


def test_peft_lora_components_freeze_and_resume(tmp_path):
    # lora_B starts at zero, so lora_A does not move on step 1: a 2-step grace period gives the
    # relative rule a reference taken while both adapter matrices move; freezing starts at step 5.
    check_resume("llama", tmp_path, lora=True, expected=14, save_at=5, grades={**GRADES, "grace_steps": 2})


def test_peft_lora_groups_adapter_tensors_per_base_matrix():
    model = make_model("llama", lora=True)
    opt = create_grades_optimizer(model, make_args("/tmp/unused"), **GRADES)
    names = [c.name for c in opt.components]
    assert names[0] == "model.layers.0.self_attn.q_proj"
    for comp in opt.components:
        assert len(comp.param_names) == 2 and all(".lora_" in n for n in comp.param_names)
    # the base weights are not trainable, hence not in the optimizer at all
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(p.requires_grad for n, p in model.named_parameters() if id(p) in held)
    assert not any("base_layer" in n for c in opt.components for n in c.param_names)


def test_factory_with_alpha_bf16_accumulation_and_clipping(tmp_path):
    """optimizer_cls_and_kwargs + factory; alpha resolved from max_steps by the callback; bf16
    autocast on CPU, gradient accumulation 2 and clipping: GradES counts optimizer steps only."""
    model = make_model("llama")
    args = make_args(tmp_path, save_strategy="no", bf16=True, gradient_accumulation_steps=2,
                     max_grad_norm=0.5, per_device_train_batch_size=2)
    watch = Watch()
    steps_seen = []

    class CountSteps(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            steps_seen.append(find_grades_optimizer(optimizer).step_count)

    trainer = Trainer(model=model, args=args, train_dataset=Data(),
                      optimizer_cls_and_kwargs=(GradESOptimizerFactory, {
                          **GRADES, "alpha": 0.25, "optimizer_kwargs": {"lr": 1e-2}}),
                      callbacks=[watch, CountSteps()])
    add_grades_callback(trainer)
    trainer.train()
    opt = find_grades_optimizer(trainer.optimizer)
    assert isinstance(opt, GradESOptimizer) and opt.total_steps == MAX_STEPS and opt.grace_steps == 2
    # once per optimizer step (not per micro-batch), in order
    assert steps_seen == list(range(1, trainer.state.global_step + 1))
    assert min(c.frozen_at_step for c in opt.components) > 2  # nothing froze during the grace period
    assert opt.should_stop and trainer.state.global_step < MAX_STEPS
    watch.assert_frozen_unchanged(opt)
    # the parameters stayed fp32 (autocast, not a bf16 model) and every training log has the figures
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all("grades_frozen" in lg for lg in watch.logs if "loss" in lg)


def test_optimizers_tuple_with_trainer_built_scheduler(tmp_path):
    """optimizers=(opt, None): Trainer builds its scheduler on accelerate's wrapper around ours."""
    model = make_model("gpt2")
    args = make_args(tmp_path, save_strategy="no")
    opt = create_grades_optimizer(model, args, tau=1e9, grace_steps=3)  # everything freezes at step 3
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None),
                      callbacks=[GradESCallback(opt)])
    trainer.train()
    assert trainer.state.global_step == 3 and opt.should_stop
    assert {c.frozen_at_step for c in opt.components} == {3}
    assert trainer.lr_scheduler.optimizer is trainer.optimizer  # the scheduler drives the live groups
    assert opt.param_groups[0]["lr"] < 1e-2


def test_reporters_registered_before_the_callback_see_the_figures(tmp_path):
    seen = []

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    model = make_model("gpt2")
    args = make_args(tmp_path, save_strategy="no", max_steps=2)
    opt, sched = create_grades_optimizer_and_scheduler(model, args, tau=1e-30)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, sched),
                      callbacks=[Reporter(), GradESCallback()])
    cb = add_grades_callback(trainer)  # moves the existing GradESCallback to the front
    assert trainer.callback_handler.callbacks[0] is cb
    assert sum(isinstance(c, GradESCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    train_logs = [lg for lg in seen if "loss" in lg]
    assert len(train_logs) == 2 and all(lg["grades_frozen"] == 0 for lg in train_logs)


def test_alpha_without_callback_refuses_to_train_silently(tmp_path):
    model = make_model("gpt2")
    args = make_args(tmp_path, save_strategy="no", max_steps=2)
    opt = create_grades_optimizer(model, args, tau=1.0, alpha=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="GradESCallback"):
        trainer.train()


def test_callback_refuses_a_plain_optimizer(tmp_path):
    model = make_model("gpt2")
    args = make_args(tmp_path, save_strategy="no", max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[GradESCallback()])
    with pytest.raises(TypeError, match="not a GradESOptimizer"):
        trainer.train()


def test_bad_arguments_name_the_argument(tmp_path):
    model = make_model("gpt2")
    args = make_args(tmp_path, save_strategy="no")
    with pytest.raises(TypeError, match="optimizer_cls"):
        GradESOptimizerFactory()(model, optimizer_cls=dict, tau=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        GradESOptimizerFactory()(model, weight_decay=-1.0, tau=1.0)
    with pytest.raises(ValueError, match="num_training_steps"):
        create_grades_optimizer_and_scheduler(model, make_args(tmp_path, max_steps=-1), tau=1.0)
    with pytest.raises(TypeError, match="args"):
        create_grades_optimizer(model, {"lr": 1}, tau=1.0)
    with pytest.raises(ValueError, match="alpha"):
        create_grades_optimizer(model, args, tau=1.0, alpha=1.5)
    with pytest.raises(TypeError, match="optimizer"):
        GradESCallback(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="trainer"):
        add_grades_callback(object())


def test_resuming_a_run_gradES_already_ended(tmp_path):
    """The final checkpoint of a GradES-stopped run: full fine-tuning stops after the one step
    Trainer always takes (projection matrices untouched); LoRA-only has nothing trainable left
    and gets a clear error instead of autograd's "does not require grad"."""
    trainer, opt, _, _ = train("gpt2", tmp_path / "a", args_kw={"save_steps": 100})
    stop = trainer.state.global_step
    final = str(tmp_path / "a" / f"checkpoint-{stop}")
    trainer_b, opt_b, watch_b, cb_b = train("gpt2", tmp_path / "b", resume=final, args_kw={"save_steps": 100})
    assert trainer_b.state.global_step == stop + 1 and cb_b.stopped_at_step == stop + 1
    assert opt_b.step_count == stop + 1 and all(c.frozen_at_step <= stop for c in opt_b.components)
    a, b = final_params(trainer.model), final_params(trainer_b.model)
    for comp in opt.components:
        for name in comp.param_names:
            assert torch.equal(a[name], b[name]), name

    lora_grades = {**GRADES, "grace_steps": 2}
    trainer, _, _, _ = train("llama", tmp_path / "c", lora=True, args_kw={"save_steps": 100}, grades=lora_grades)
    final = str(tmp_path / "c" / f"checkpoint-{trainer.state.global_step}")
    with pytest.raises(RuntimeError, match="nothing to resume"):
        train("llama", tmp_path / "d", lora=True, resume=final, args_kw={"save_steps": 100}, grades=lora_grades)


def test_default_training_arguments_and_a_bf16_model_reach_the_fused_path(tmp_path):
    """Trainer's default optim (adamw_torch_fused: step counters on the device) and a pure-bf16 model
    (moments in bf16) both run the fused kernel (interpreted here, impl='triton'), and still freeze."""
    assert TrainingArguments(output_dir=str(tmp_path)).optim == "adamw_torch_fused"
    model = make_model("llama").to(torch.bfloat16)
    args = make_args(tmp_path)
    opt, sched = create_grades_optimizer_and_scheduler(model, args, impl="triton", **GRADES)
    assert type(opt.optimizer) is torch.optim.AdamW and opt.optimizer.defaults["fused"]
    paths, dtypes = [], set()

    class Path(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            paths.append(opt.fast_path)
            if state.global_step == 1:  # before any freeze released a state
                dtypes.update(opt.state[t]["exp_avg"].dtype for c in opt.components for t in tensors(opt, c))

    trainer = Trainer(model=model, args=args, train_dataset=Data(classification=False), optimizers=(opt, sched),
                      callbacks=[Path()])
    add_grades_callback(trainer)
    trainer.train()
    assert paths and all(p is not None and p.startswith("triton fused AdamW") for p in paths), opt.fast_path_reason
    assert any(c.frozen for c in opt.components) and dtypes == {torch.bfloat16}
