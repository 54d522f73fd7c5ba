"""Component discovery: one component per projection matrix, for real transformers 5.x modules.

Every model is built from a tiny config with random weights (no hub access). The expected
names below were read off the real modules of transformers 5.24, not guessed.
"""
import functools
import re
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from grades_optim.components import (
    KINDS, ComponentSpec, components_from_mapping, discover_components, infer_kind,
)

H = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OPT_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
BERT = {"attention.self.query": "attention", "attention.self.key": "attention",
        "attention.self.value": "attention", "attention.output.dense": "attention",
        "intermediate.dense": "mlp", "output.dense": "mlp"}
T5_SELF = {f"layer.0.SelfAttention.{x}": "attention" for x in "qkvo"}
T5_CROSS = {f"layer.1.EncDecAttention.{x}": "attention" for x in "qkvo"}
# Substrings of parameter names that must never be tracked by the default matcher.
NOT_PROJECTIONS = ("embed", "norm", "LayerNorm", "lm_head", "pooler", "classifier", "score", "wte.",
                   "wpe.", "shared.weight", "mlp.gate.", "router", "shared_expert_gate",
                   "relative_attention_bias", "logit_", "patch_embedding", "sinks", "head.")


def _kinds(prefix, attention=(), mlp=()):
    return {**{f"{prefix}{a}": "attention" for a in attention}, **{f"{prefix}{m}": "mlp" for m in mlp}}


def _with_prefix(prefix, table):
    return {prefix + k: v for k, v in table.items()}


def _auto(model_type, head="causal", **kw):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    auto = {"causal": AutoModelForCausalLM, "base": AutoModel, "cls": AutoModelForSequenceClassification}[head]
    return auto.from_config(AutoConfig.for_model(model_type, **kw))


def _clip(kind):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
    sub = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(sub, vocab_size=100, max_position_embeddings=16)
    vision = dict(sub, image_size=8, patch_size=4)
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


SEQ2SEQ = dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=100)
T5 = dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=100)
MOE = dict(H, num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=16)

# family -> (builder, expected layer-0 components {name: kind}, total component count)
FAMILIES = {
    "llama": (lambda: _auto("llama", **H, num_key_value_heads=2),
              _kinds("model.layers.0.", LLAMA_ATTN, LLAMA_MLP), 14),
    "qwen2": (lambda: _auto("qwen2", **H, num_key_value_heads=2),
              _kinds("model.layers.0.", LLAMA_ATTN, LLAMA_MLP), 14),
    "qwen3": (lambda: _auto("qwen3", **H, num_key_value_heads=2, head_dim=8),
              _kinds("model.layers.0.", LLAMA_ATTN, LLAMA_MLP), 14),
    "mistral_cls": (lambda: _auto("mistral", "cls", **H, num_key_value_heads=2, pad_token_id=0),
                    _kinds("model.layers.0.", LLAMA_ATTN, LLAMA_MLP), 14),
    "gemma": (lambda: _auto("gemma", **H, num_key_value_heads=2, head_dim=8),
              _kinds("model.layers.0.", LLAMA_ATTN, LLAMA_MLP), 14),
    "phi3": (lambda: _auto("phi3", **H, pad_token_id=0),
             _kinds("model.layers.0.", ("self_attn.qkv_proj", "self_attn.o_proj"),
                    ("mlp.gate_up_proj", "mlp.down_proj")), 8),
    "phi": (lambda: _auto("phi", **H),
            _kinds("model.layers.0.", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.dense"), ("mlp.fc1", "mlp.fc2")), 12),
    "gpt2": (lambda: _auto("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
             _kinds("transformer.h.0.", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")), 8),
    "gpt_bigcode": (lambda: _auto("gpt_bigcode", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
                    _kinds("transformer.h.0.", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")), 8),
    "starcoder2": (lambda: _auto("starcoder2", **H, num_key_value_heads=2),
                   _kinds("model.layers.0.", LLAMA_ATTN, ("mlp.c_fc", "mlp.c_proj")), 12),
    "bert_cls": (lambda: _auto("bert", "cls", **H), _with_prefix("bert.encoder.layer.0.", BERT), 12),
    "roberta": (lambda: _auto("roberta", "base", **H), _with_prefix("encoder.layer.0.", BERT), 12),
    "deberta_v2": (lambda: _auto("deberta-v2", "base", **H),
                   _with_prefix("encoder.layer.0.", {k + ("_proj" if ".self." in k else ""): v
                                                     for k, v in BERT.items()}), 12),
    "deberta": (lambda: _auto("deberta", "base", **H),  # v1: fused in_proj, its q/v biases apart
                _with_prefix("encoder.layer.0.", {"attention.self.in_proj": "attention",
                                                  **{k: v for k, v in BERT.items() if ".self." not in k}}), 8),
    # one layer shared by every depth: 6 components however many hidden layers
    "albert": (lambda: _auto("albert", "base", **H, embedding_size=16),
               _kinds("encoder.albert_layer_groups.0.albert_layers.0.",
                      ("attention.query", "attention.key", "attention.value", "attention.dense"),
                      ("ffn", "ffn_output")), 6),
    "distilbert": (lambda: _auto("distilbert", "base", dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100),
                   _kinds("transformer.layer.0.", ("attention.q_lin", "attention.k_lin", "attention.v_lin",
                                                   "attention.out_lin"), ("ffn.lin1", "ffn.lin2")), 12),
    "t5": (lambda: _auto("t5", "base", **T5),
           {**_with_prefix("encoder.block.0.", T5_SELF),
            **_kinds("encoder.block.0.layer.1.", (), ("DenseReluDense.wi", "DenseReluDense.wo")),
            **_with_prefix("decoder.block.0.", {**T5_SELF, **T5_CROSS}),
            **_kinds("decoder.block.0.layer.2.", (), ("DenseReluDense.wi", "DenseReluDense.wo"))}, 32),
    "t5_gated": (lambda: _auto("t5", "base", **T5, feed_forward_proj="gated-gelu"),
                 {**_with_prefix("encoder.block.0.", T5_SELF),
                  **_kinds("encoder.block.0.layer.1.", (), ("DenseReluDense.wi_0", "DenseReluDense.wi_1",
                                                            "DenseReluDense.wo")),
                  **_with_prefix("decoder.block.0.", {**T5_SELF, **T5_CROSS}),
                  **_kinds("decoder.block.0.layer.2.", (), ("DenseReluDense.wi_0", "DenseReluDense.wi_1",
                                                            "DenseReluDense.wo"))}, 36),
    "gpt_neox": (lambda: _auto("gpt_neox", **H),
                 _kinds("gpt_neox.layers.0.", ("attention.query_key_value", "attention.dense"),
                        ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")), 8),
    "falcon": (lambda: _auto("falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
               _kinds("transformer.h.0.", ("self_attention.query_key_value", "self_attention.dense"),
                      ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")), 8),
    "bloom": (lambda: _auto("bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=100),
              _kinds("transformer.h.0.", ("self_attention.query_key_value", "self_attention.dense"),
                     ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")), 8),
    "mpt": (lambda: _auto("mpt", d_model=32, n_layers=2, n_heads=4, vocab_size=100),
            _kinds("transformer.blocks.0.", ("attn.Wqkv", "attn.out_proj"), ("ffn.up_proj", "ffn.down_proj")), 8),
    "codegen": (lambda: _auto("codegen", n_embd=32, n_layer=2, n_head=4, vocab_size=100, rotary_dim=4, n_positions=64),
                _kinds("transformer.h.0.", ("attn.qkv_proj", "attn.out_proj"), ("mlp.fc_in", "mlp.fc_out")), 8),
    "gptj": (lambda: _auto("gptj", n_embd=32, n_layer=2, n_head=4, vocab_size=100, rotary_dim=4, n_positions=64),
             _kinds("transformer.h.0.", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
                    ("mlp.fc_in", "mlp.fc_out")), 12),
    "opt": (lambda: _auto("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=100, word_embed_proj_dim=32),
            _kinds("model.decoder.layers.0.", OPT_ATTN, ("fc1", "fc2")), 12),
    "bart": (lambda: _auto("bart", "base", **SEQ2SEQ),
             {**_kinds("encoder.layers.0.", OPT_ATTN, ("fc1", "fc2")),
              **_kinds("decoder.layers.0.", OPT_ATTN + tuple(a.replace("self_attn", "encoder_attn") for a in OPT_ATTN),
                       ("fc1", "fc2"))}, 32),
    "whisper": (lambda: _auto("whisper", "base", **SEQ2SEQ, num_mel_bins=8, max_source_positions=16,
                              max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1),
                {**_kinds("encoder.layers.0.", OPT_ATTN, ("fc1", "fc2")),
                 **_kinds("decoder.layers.0.", OPT_ATTN + tuple(a.replace("self_attn", "encoder_attn")
                                                                for a in OPT_ATTN), ("fc1", "fc2"))}, 32),
    "clip": (lambda: _clip("clip"),
             {**_kinds("text_model.encoder.layers.0.", OPT_ATTN, ("mlp.fc1", "mlp.fc2")),
              **_kinds("vision_model.encoder.layers.0.", OPT_ATTN, ("mlp.fc1", "mlp.fc2"))}, 24),
    "siglip": (lambda: _clip("siglip"),  # the vision pooling head's attention/mlp is outside the layers
               {**_kinds("text_model.encoder.layers.0.", OPT_ATTN, ("mlp.fc1", "mlp.fc2")),
                **_kinds("vision_model.encoder.layers.0.", OPT_ATTN, ("mlp.fc1", "mlp.fc2"))}, 24),
    "vit": (lambda: _auto("vit", "base", **H, image_size=8, patch_size=4),
            _kinds("layers.0.", ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
                   ("mlp.fc1", "mlp.fc2")), 12),
    "qwen3_moe": (lambda: _auto("qwen3_moe", **MOE, head_dim=8, num_experts=4),
                  _kinds("model.layers.0.", LLAMA_ATTN, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")), 12),
    "mixtral": (lambda: _auto("mixtral", **H, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                _kinds("model.layers.0.", LLAMA_ATTN, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")), 12),
    "qwen2_moe": (lambda: _auto("qwen2_moe", **MOE, num_experts=4, shared_expert_intermediate_size=32),
                  _kinds("model.layers.0.", LLAMA_ATTN, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                         "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                                         "mlp.shared_expert.down_proj")), 18),
    "gpt_oss": (lambda: _auto("gpt_oss", **H, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              head_dim=8),
                _kinds("model.layers.0.", LLAMA_ATTN, ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")), 12),
    # Layer 0 is dense (first_k_dense_replace=1), layer 1 is MoE with shared experts.
    "deepseek_v3": (lambda: _auto("deepseek_v3", **dict(H, num_key_value_heads=4), n_routed_experts=4,
                                  n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
                                  qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
                    _kinds("model.layers.0.", ("self_attn.q_a_proj", "self_attn.q_b_proj",
                                               "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                                               "self_attn.o_proj"), LLAMA_MLP), 18),
}


def fresh(family):
    """A new tiny model, for tests that change it (requires_grad, PEFT, wrappers inside)."""
    pytest.importorskip("transformers").logging.set_verbosity_error()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[family][0]()


@functools.lru_cache(maxsize=None)
def build(family):
    """Each tiny model once per session; tests must not change it (use ``fresh``)."""
    return fresh(family)


def _layer_index(name):
    return int(re.search(r"\.(?:layers|layer|h|block|blocks|albert_layers)\.(\d+)\.", "." + name).group(1))


def _by_name(specs):
    return {s.name: s for s in specs}


def _check_invariants(specs):
    seen = set()
    for spec in specs:
        assert isinstance(spec, ComponentSpec) and spec.kind in KINDS and spec.params
        for pname, p in spec.params:
            assert isinstance(p, nn.Parameter) and id(p) not in seen, f"{pname} tracked twice"
            seen.add(id(p))


# Module names that transformers 5 changed (fused 3-D experts, ViT's q/k/v/o_proj); 4.x names are
# covered by test_per_expert_moe_4x_style and the table's ViT 4.x entries.
V5_NAMES = {"vit", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"}


def _skip_before_transformers_5():
    if int(pytest.importorskip("transformers").__version__.split(".")[0]) < 5:
        pytest.skip("expected names are transformers 5.x")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_layer0_and_total(family):
    _, expected, total = FAMILIES[family]
    model = build(family)
    if family in V5_NAMES:
        _skip_before_transformers_5()
    specs = discover_components(model)
    _check_invariants(specs)
    layer0 = {s.name: s.kind for s in specs if _layer_index(s.name) == 0}
    assert layer0 == expected
    assert len(specs) == total
    for spec in specs:
        for pname, _ in spec.params:
            # a matrix's parameters are its weight and (optional) bias, or the bare 3-D expert tensor
            # (DeBERTa v1: the fused in_proj's q/v biases live on its parent module)
            parent = spec.name.rpartition(".")[0]
            assert pname in (f"{spec.name}.weight", f"{spec.name}.bias", spec.name, f"{spec.name}_bias",
                             f"{parent}.q_bias", f"{parent}.v_bias"), pname
            assert not any(bad in pname for bad in NOT_PROJECTIONS), pname


@pytest.mark.parametrize("family,name", [
    ("qwen2", "model.layers.0.self_attn.q_proj"),
    ("bert_cls", "bert.encoder.layer.0.attention.output.dense"),
    ("gpt2", "transformer.h.0.attn.c_attn"),
])
def test_bias_is_grouped_with_its_weight(family, name):
    spec = _by_name(discover_components(build(family)))[name]
    assert [p for p, _ in spec.params] == [f"{name}.weight", f"{name}.bias"]


def test_layer_norm_next_to_dense_is_not_merged():
    # BERT's attention.output holds dense and LayerNorm side by side: the key must tell them apart
    specs = _by_name(discover_components(build("bert_cls")))
    assert not any("LayerNorm" in p for s in specs.values() for p, _ in s.params)
    assert "bert.pooler.dense" not in specs and "classifier" not in specs


def test_fused_moe_experts_and_expert_biases():
    _skip_before_transformers_5()
    specs = _by_name(discover_components(build("gpt_oss")))
    up = specs["model.layers.0.mlp.experts.gate_up_proj"]
    assert up.kind == "mlp" and up.params[0][1].dim() == 3
    assert [p for p, _ in up.params] == ["model.layers.0.mlp.experts.gate_up_proj",
                                         "model.layers.0.mlp.experts.gate_up_proj_bias"]
    moe_layer = {n: s.kind for n, s in _by_name(discover_components(build("deepseek_v3"))).items()
                 if n.startswith("model.layers.1.mlp.")}
    assert moe_layer == _kinds("model.layers.1.", (), (
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"))


def test_per_expert_moe_4x_style():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16)

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 2, bias=False)
            self.experts = nn.ModuleList([Expert(), Expert()])

    root = nn.Module()
    root.layers = nn.ModuleList([nn.Module()])
    root.layers[0].block_sparse_moe = Moe()
    names = {s.name: s.kind for s in discover_components(root)}
    assert names == {f"layers.0.block_sparse_moe.experts.{e}.{w}": "mlp" for e in (0, 1) for w in ("w1", "w2", "w3")}


def test_plain_torch_transformer_encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), num_layers=2)
    specs = _by_name(discover_components(model))
    assert {n: s.kind for n, s in specs.items() if n.startswith("layers.0.")} == _kinds(
        "layers.0.", ("self_attn.in_proj", "self_attn.out_proj"), ("linear1", "linear2"))
    assert [p for p, _ in specs["layers.0.self_attn.in_proj"].params] == [
        "layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias"]


def test_frozen_parameters_are_not_tracked():
    model = fresh("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    names = _by_name(discover_components(model))
    assert "model.layers.0.self_attn.q_proj" not in names and len(names) == 13


def test_shared_module_is_tracked_once():
    # ALBERT-style weight sharing: the same Linear in two layers is one parameter, one component
    shared = nn.Linear(8, 8)
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Module(), nn.Module()])
    root.layers[0].q_proj = root.layers[1].q_proj = shared
    specs = discover_components(root)
    assert [s.name for s in specs] == ["layers.0.q_proj"]


def test_deberta_v1_split_biases_join_the_fused_projection():
    specs = _by_name(discover_components(fresh("deberta")))
    in_proj = specs["encoder.layer.0.attention.self.in_proj"]
    assert sorted(n.rpartition(".")[2] for n, _ in in_proj.params) == ["q_bias", "v_bias", "weight"]
    # a module that merely has parameters called q_bias (no fused in_proj beside them) is not special
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Module()])
    root.layers[0].q_proj = nn.Linear(4, 4)
    root.layers[0].q_bias = nn.Parameter(torch.zeros(4))
    assert [n for s in discover_components(root) for n, _ in s.params] == ["layers.0.q_proj.weight",
                                                                          "layers.0.q_proj.bias"]


# ---- wrapper prefixes ---------------------------------------------------------------------------

class _Wrap(nn.Module):
    def __init__(self, attr, inner):
        super().__init__()
        setattr(self, attr, inner)


WRAPPERS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _summary(specs):
    return [(s.name, s.kind, tuple(id(p) for _, p in s.params)) for s in specs]


@pytest.mark.parametrize("attr", WRAPPERS)
def test_wrapper_prefix_is_stripped(attr):
    model = build("llama")
    specs = discover_components(_Wrap(attr, model))
    assert _summary(specs) == _summary(discover_components(model))
    assert specs[0].params[0][0] == f"{attr}.model.layers.0.self_attn.q_proj.weight"  # real name kept


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(WRAPPERS), max_size=4))
def test_any_nesting_of_wrappers_gives_the_same_components(attrs):
    model = build("gpt2")
    wrapped = model
    for attr in attrs:
        wrapped = _Wrap(attr, wrapped)
    assert _summary(discover_components(wrapped)) == _summary(discover_components(model))


def test_torch_compile_names_are_stripped():
    model = build("bert_cls")
    compiled = torch.compile(model)  # compiles lazily, on the first call only
    assert next(n for n, _ in compiled.named_parameters()).startswith("_orig_mod.")
    assert _summary(discover_components(compiled)) == _summary(discover_components(model))


def test_real_checkpoint_wrapper_inside_layers():
    cw = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    model = fresh("llama")
    model.model.layers[0] = cw.checkpoint_wrapper(model.model.layers[0])
    names = [s.name for s in discover_components(model)]
    assert names[:7] == [f"model.layers.0.{p}" for p in LLAMA_ATTN + LLAMA_MLP] and len(names) == 14


# ---- PEFT ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _lora_llama(peft, **cfg):
    return peft.get_peft_model(fresh("llama"), peft.LoraConfig(r=4, **cfg))


def test_lora_groups_adapter_tensors_and_never_tracks_base(peft):
    model = _lora_llama(peft, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    specs = _by_name(discover_components(model))
    expected = {}
    for i in (0, 1):
        expected.update(_kinds(f"model.layers.{i}.", ("self_attn.q_proj", "self_attn.v_proj"), ("mlp.down_proj",)))
    assert {n: s.kind for n, s in specs.items()} == expected
    q = specs["model.layers.0.self_attn.q_proj"]
    assert [p for p, _ in q.params] == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert not any("base_layer" in p or "embed" in p for s in specs.values() for p, _ in s.params)


def test_lora_all_adapters_of_one_matrix_form_one_component(peft):
    model = _lora_llama(peft, target_modules=["q_proj", "v_proj"])
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    specs = discover_components(model)
    assert len(specs) == 4
    q = _by_name(specs)["model.layers.0.self_attn.q_proj"]
    suffixes = [p.split("q_proj.")[1] for p, _ in q.params]
    assert suffixes == ["lora_A.default.weight", "lora_A.second.weight",
                        "lora_B.default.weight", "lora_B.second.weight"]
    # the inactive adapter is frozen by PEFT until set_adapter; it is still part of the matrix
    assert [p.requires_grad for _, p in q.params] == [True, False, True, False]


def test_lora_matrix_with_no_trainable_adapter_tensor_is_not_tracked(peft):
    model = _lora_llama(peft, target_modules=["q_proj", "v_proj"])
    for p in model.base_model.model.model.layers[0].self_attn.q_proj.parameters():
        p.requires_grad_(False)
    names = [s.name for s in discover_components(model)]
    assert "model.layers.0.self_attn.q_proj" not in names and len(names) == 3


def test_dora_magnitude_joins_its_matrix(peft):
    model = _lora_llama(peft, target_modules=["o_proj"], use_dora=True)
    spec = discover_components(model)[0]
    assert spec.name == "model.layers.0.self_attn.o_proj"
    assert [p.split("o_proj.")[1] for p, _ in spec.params] == [
        "lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"]


@pytest.mark.parametrize("tuner,extra,tensors", [
    ("LoHaConfig", {"r": 2}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("LoKrConfig", {"r": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("AdaLoraConfig", {"r": 2, "total_step": 10}, {"lora_A", "lora_B", "lora_E"}),  # not the frozen ranknum
    ("IA3Config", {"feedforward_modules": []}, {"ia3_l"}),
])
def test_other_peft_tuners_group_by_base_module(peft, tuner, extra, tensors):
    config = getattr(peft, tuner)(target_modules=["gate_proj"], **extra)
    specs = discover_components(peft.get_peft_model(fresh("llama"), config))
    assert [s.name for s in specs] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    assert {p.split("gate_proj.")[1].split(".")[0] for p, _ in specs[0].params} == tensors


def test_lora_on_gpt2_conv1d_and_ddp_wrapped(peft):
    model = peft.get_peft_model(fresh("gpt2"), peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    specs = discover_components(_Wrap("module", model))
    assert [(s.name, s.kind) for s in specs] == [("transformer.h.0.attn.c_attn", "attention"),
                                                 ("transformer.h.1.attn.c_attn", "attention")]


def test_lora_seq_cls_head_copy_is_not_a_component(peft):
    model = peft.get_peft_model(fresh("bert_cls"), peft.LoraConfig(
        r=4, task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    names = [s.name for s in discover_components(model)]
    assert names == [f"bert.encoder.layer.{i}.attention.self.{x}" for i in (0, 1) for x in ("query", "value")]


def test_user_matcher_keeps_lora_grouping(peft):
    model = _lora_llama(peft, target_modules=["q_proj", "v_proj"])
    specs = discover_components(model, matcher=r"layers\.1\..*v_proj$")
    assert [(s.name, len(s.params)) for s in specs] == [("model.layers.1.self_attn.v_proj", 2)]


# ---- user matchers ------------------------------------------------------------------------------

def test_regex_matcher_replaces_the_table():
    model = build("llama")
    specs = discover_components(model, matcher=r"self_attn\.[qv]_proj$")
    assert [(s.name, s.kind) for s in specs] == [
        (f"model.layers.{i}.self_attn.{x}_proj", "attention") for i in (0, 1) for x in "qv"]
    compiled = discover_components(model, matcher=re.compile(r"embed_tokens|input_layernorm"))
    assert [(s.name, s.kind) for s in compiled] == [
        ("model.embed_tokens", "other"), ("model.layers.0.input_layernorm", "other"),
        ("model.layers.1.input_layernorm", "other")]


def test_callable_matcher_kinds():
    model = build("llama")
    specs = discover_components(model, matcher=lambda k: "mlp" if k == "lm_head" else k.endswith("o_proj"))
    assert [(s.name, s.kind) for s in specs] == [
        ("model.layers.0.self_attn.o_proj", "attention"), ("model.layers.1.self_attn.o_proj", "attention"),
        ("lm_head", "mlp")]


@pytest.mark.parametrize("matcher,error,text", [
    (3, TypeError, "matcher"),
    ("(unclosed", ValueError, "matcher"),
    (lambda k: "ffn", ValueError, "matcher"),
    (lambda k: 1, TypeError, "matcher"),
    (r"no_such_module", ValueError, "matcher='no_such_module'"),
])
def test_matcher_errors(matcher, error, text):
    with pytest.raises(error, match=re.escape(text)):
        discover_components(build("llama"), matcher=matcher)


def test_no_match_error_says_what_was_searched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError) as info:
        discover_components(model)
    msg = str(info.value)
    for part in ("Sequential", "4 trainable parameters", ".layers.N.", ".h.N.", "q_proj", "query_key_value",
                 "0.weight", "2.bias", "matcher=", "components="):
        assert part in msg, part
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        discover_components(model)
    with pytest.raises(TypeError, match="model"):
        discover_components({"not": "a module"})


# ---- infer_kind and explicit mappings -----------------------------------------------------------

@pytest.mark.parametrize("key,kind", [
    ("encoder.layer.0.attention.output.dense", "attention"),
    ("encoder.layer.0.output.dense", "mlp"),
    ("transformer.h.0.attn.c_proj", "attention"),
    ("transformer.h.0.mlp.c_proj", "mlp"),
    ("model.layers.3.mlp.experts.gate_up_proj", "mlp"),
    ("module.base_model.model.model.layers.0.self_attn.k_proj.weight", "attention"),
    ("my_q_proj", "other"),
    ("pooler.dense", "other"),
    ("model.layers.0.mlp.gate", "other"),
])
def test_infer_kind(key, kind):
    assert infer_kind(key) == kind


def test_mapping_accepts_each_value_form():
    model = build("llama")
    layer = model.model.layers[0]
    specs = components_from_mapping({
        "q": layer.self_attn.q_proj.weight,
        "layer0.k_proj": layer.self_attn.k_proj,
        "mlp_in": ("mlp", [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
        "pair": (layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight),
    }, model=model)
    assert [(s.name, s.kind, [p for p, _ in s.params]) for s in specs] == [
        ("q", "other", ["model.layers.0.self_attn.q_proj.weight"]),
        ("layer0.k_proj", "attention", ["model.layers.0.self_attn.k_proj.weight"]),
        ("mlp_in", "mlp", ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]),
        ("pair", "other", ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"]),
    ]
    anonymous = components_from_mapping({"block": layer.mlp})
    assert [p for p, _ in anonymous[0].params] == ["block.0", "block.1", "block.2"]


def test_mapping_errors():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    cases = [
        ([a.weight], TypeError, "components"),
        ({}, ValueError, "empty"),
        ({"x": []}, ValueError, "'x' has no parameters"),
        ({"x": frozen}, ValueError, "'x' has no parameters with requires_grad=True"),
        ({"x": torch.zeros(2)}, TypeError, "'x'"),
        ({"x": [a.weight, torch.zeros(2)]}, TypeError, "'x' holds a Tensor"),
        ({"x": "a.weight"}, TypeError, "'x'"),
        ({"x": 3}, TypeError, "'x'"),
        ({"x": a, "y": [a.bias, b.weight]}, ValueError, "in both 'x' and 'y'"),
        ({"x": ("ffn", a)}, ValueError, "'x' has kind 'ffn'"),
        ({3: a}, TypeError, "components"),
    ]
    for mapping, error, text in cases:
        with pytest.raises(error, match=re.escape(text)):
            components_from_mapping(mapping)
    with pytest.raises(TypeError, match="model"):
        components_from_mapping({"x": a}, model="not a module")
