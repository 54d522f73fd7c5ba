"""Components: one per projection matrix (q, k, v, o, gate, up, down and their equivalents).

A component is the unit GradES measures and freezes. It is identified by the *positions* of its
parameters in the inner optimizer's ``param_groups`` (``(group, index)``), never by parsing name
strings: names are for logs and reports only (DESIGN §7). Positions stay valid when accelerate
swaps Parameter objects in place (FSDP2), and holding no Parameter references keeps sharded-away
weights collectable.

Discovery (:func:`discover_components`) turns each parameter name into a *key*, the path of the
matrix it belongs to, and keeps the keys the matcher accepts:

- Wrapper segments (``module.`` DDP, ``_orig_mod.`` torch.compile, ``_fsdp_wrapped_module.``,
  ``_checkpoint_wrapped_module.``) and PEFT's leading ``base_model.model.`` are dropped, so a
  name reads the same however the model is wrapped.
- ``.weight``/``.bias`` (and ``_weight``/``_bias`` endings such as ``in_proj_bias`` or GPT-OSS's
  ``gate_up_proj_bias``) are dropped: a bias is part of its matrix. 3-D fused MoE experts
  (``mlp.experts.gate_up_proj``) have no suffix; each is one component.
- PEFT tuner layers are found structurally (a module with a ``base_layer`` child and PEFT's
  ``adapter_layer_names``), not by a list of tensor names, so LoRA, DoRA, AdaLoRA, LoHa, LoKr, IA3…
  all group the same way: every adapter tensor of one base matrix, of *every* adapter, is one
  component keyed by the base module's path, and ``base_layer`` weights are never tracked.
  Inactive adapters' tensors (``requires_grad=False`` until ``set_adapter``) are included so
  the component stays whole when the user switches adapter; a base matrix none of whose adapter
  tensors is trainable is not tracked, since it could never be measured and would block
  ``should_stop``.
- The default matcher accepts a key only inside a numbered layer container and only if its tail
  is in ``_PROJECTIONS`` (longest tail wins, so BERT's ``attention.output.dense`` is attention
  while the layer-level ``output.dense`` is MLP). Embeddings, norms, heads, poolers and MoE
  routers are not in the table, so they are never components.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

__all__ = ["Component", "ComponentSpec", "discover_components", "components_from_mapping", "infer_kind"]

KINDS = ("attention", "mlp", "other")

Matcher = Union[str, re.Pattern, Callable[[str], Union[str, bool, None]]]

# Tails of module paths (after the last numbered layer container; ``*`` stands for a number) that
# name a projection matrix. Listed from real transformers 5.24 modules (tests build each family).
_ATTENTION = (
    # Llama/Qwen/Mistral/Gemma/OLMo, OPT/BART/Whisper/CLIP/SigLIP, GPT-J, ViT 5.x, Starcoder2
    "q_proj", "k_proj", "v_proj", "o_proj",
    "self_attn.out_proj", "encoder_attn.out_proj", "attn.out_proj", "attention.out_proj",
    # DeepSeek MLA
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
    # fused q|k|v: Phi-3, CodeGen; GPT-NeoX, Falcon, BLOOM; MPT; GPT-2, GPT-BigCode (Conv1D)
    "qkv_proj", "query_key_value", "Wqkv", "attn.c_attn", "attn.c_proj",
    # output projections named "dense": Phi-1/2, GPT-NeoX, Falcon, BLOOM
    "self_attn.dense", "attention.dense", "self_attention.dense",
    # BERT/RoBERTa/ELECTRA/MiniLM (+cross-attention), DeBERTa-v2, DeBERTa (fused in_proj), ViT 4.x
    "self.query", "self.key", "self.value", "self.query_proj", "self.key_proj", "self.value_proj",
    "self.in_proj", "attention.output.dense", "crossattention.output.dense",
    "attention.query", "attention.key", "attention.value",
    # DistilBERT
    "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
    # T5
    "SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
    "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o",
    # torch.nn.TransformerEncoderLayer/DecoderLayer (nn.MultiheadAttention)
    "self_attn.in_proj", "multihead_attn.in_proj", "multihead_attn.out_proj",
)
_MLP = (
    # gated MLPs, their MoE shared experts, 5.x fused experts (3-D), Phi-3 fused, MPT ffn
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    # OPT/BART/Whisper (layer level), CLIP/SigLIP/Phi/ViT (mlp.), CodeGen/GPT-J
    "fc1", "fc2", "fc_in", "fc_out",
    # GPT-2, GPT-BigCode, Starcoder2
    "c_fc", "mlp.c_proj",
    # GPT-NeoX, Falcon, BLOOM
    "dense_h_to_4h", "dense_4h_to_h",
    # BERT family, DeBERTa, ViT 4.x (the layer-level output.dense; see attention.output.dense)
    "intermediate.dense", "output.dense",
    "ffn.lin1", "ffn.lin2",
    "DenseReluDense.wi", "DenseReluDense.wo", "DenseReluDense.wi_0", "DenseReluDense.wi_1",
    # transformers 4.x per-expert MoE (Mixtral block_sparse_moe; Qwen-MoE uses *_proj above)
    "experts.*.w1", "experts.*.w2", "experts.*.w3",
    "linear1", "linear2",
    # ALBERT (one shared layer per group: albert_layer_groups.G.albert_layers.N.ffn / ffn_output)
    "ffn", "ffn_output",
)
_PROJECTIONS = {**{t: "attention" for t in _ATTENTION}, **{t: "mlp" for t in _MLP}}

_LAYER_CONTAINERS = ("layers", "layer", "h", "block", "blocks", "albert_layers")
_LAYER_RE = re.compile(r"(?:^|\.)(?:%s)\.\d+\." % "|".join(_LAYER_CONTAINERS))
_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_PEFT_ROOT = "base_model.model."


@dataclasses.dataclass
class Component:
    """One tracked projection matrix (with its bias, or its LoRA adapter tensors).

    Attributes:
        name: qualified module name with wrapper prefixes stripped (for display).
        kind: ``"attention"``, ``"mlp"`` or ``"other"``.
        numel: total number of elements over its parameters.
        param_names: qualified names of its parameters (display only).
        positions: ``(group_index, param_index)`` of each parameter in the inner optimizer.
        frozen_at_step: the GradES step at which it froze, or ``None`` while it trains.
    """

    name: str
    kind: str
    numel: int
    param_names: tuple
    positions: tuple
    frozen_at_step: Optional[int] = None

    @property
    def frozen(self) -> bool:
        return self.frozen_at_step is not None


class ComponentSpec(NamedTuple):
    """What discovery returns before positions are resolved against an optimizer."""

    name: str
    kind: str
    params: tuple  # ((qualified_param_name, Parameter), ...)


def infer_kind(key: str) -> str:
    """``"attention"``, ``"mlp"`` or ``"other"`` for a module path, from the projection table.

    Used for names accepted by a user matcher or given in an explicit ``components=`` mapping,
    so it needs no layer container: ``infer_kind("my.q_proj") == "attention"``.
    """
    if not isinstance(key, str):
        raise TypeError(f"Invalid key: expected a str, got {type(key).__name__}")
    return _lookup(_module_key(_clean(key))) or "other"


def discover_components(model: nn.Module, matcher: Optional[Matcher] = None,
                        trainable: Optional[Callable[[nn.Parameter], bool]] = None) -> list[ComponentSpec]:
    """Find the projection matrices of ``model``, one :class:`ComponentSpec` each, in model order.

    Args:
        model: any ``nn.Module``, possibly wrapped (DDP, torch.compile, FSDP1 with
            ``use_orig_params=True``, activation checkpointing, PEFT).
        matcher: replaces the built-in table. A regex (``str`` or compiled) searched in each
            key, the kind then inferred by :func:`infer_kind`; or a callable ``key -> kind``
            returning a kind in ``KINDS``, ``True`` (infer the kind) or a falsy value (skip).
            Keys are cleaned module paths such as ``"model.layers.0.self_attn.q_proj"``.

    Only trainable parameters are tracked (``trainable(p)``, default ``p.requires_grad``; the
    optimizer also counts parameters a previous GradES run froze), plus the inactive-adapter
    tensors of a tracked PEFT layer, see the module docstring. Raises ``ValueError`` naming what
    was searched when nothing matches.
    """
    if trainable is None:
        def trainable(p):
            return p.requires_grad
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    kind_of = _resolve_matcher(matcher)
    hosts = _adapter_hosts(model)
    split = _split_bias_hosts(model)
    groups: dict[str, list] = {}
    live: set = set()
    examined: list[str] = []
    # named_parameters() yields each Parameter once (tied weights under their first name), and
    # each name gets exactly one key: a parameter can never land in two components.
    for name, param in model.named_parameters():
        placed = _place(name, hosts, split)
        if placed is None:
            continue
        raw_key, is_adapter = placed
        train = trainable(param)
        if train:
            examined.append(name)
        elif not is_adapter:
            continue
        key = _clean(raw_key)
        groups.setdefault(key, []).append((name, param))
        if train:
            live.add(key)
    specs = []
    for key, params in groups.items():
        if key in live:
            kind = kind_of(key)
            if kind:
                specs.append(ComponentSpec(key, kind, tuple(params)))
    if not specs:
        raise ValueError(_no_match_message(model, examined, matcher))
    return specs


def components_from_mapping(mapping: Mapping, model: Optional[nn.Module] = None) -> list[ComponentSpec]:
    """Explicit components: ``{name: Parameter | Module | iterable of Parameters | (kind, ...)}``.

    A Module contributes its ``requires_grad`` parameters (recursively); a ``(kind, value)`` tuple
    sets the kind, otherwise :func:`infer_kind` guesses it from ``name``. Parameter names for
    display come from ``model.named_parameters()`` when ``model`` is given, else ``"{name}.{i}"``.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"Invalid components: expected a mapping {{name: parameters}}, got {type(mapping).__name__}")
    if not mapping:
        raise ValueError("Invalid components: the mapping is empty")
    display: dict[int, str] = {}
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
        for pname, p in model.named_parameters(remove_duplicate=False):
            display.setdefault(id(p), pname)
    owner: dict[int, str] = {}
    specs = []
    for name, value in mapping.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"Invalid components: names must be non-empty str, got {name!r}")
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            kind, value = value
            if kind not in KINDS:
                raise ValueError(f"Invalid components: entry {name!r} has kind {kind!r}; expected one of {KINDS}")
        else:
            kind = infer_kind(name)
        params = _entry_params(name, value)
        for p in params:
            if id(p) in owner:
                raise ValueError(f"Invalid components: a parameter is in both {owner[id(p)]!r} and {name!r}")
            owner[id(p)] = name
        specs.append(ComponentSpec(name, kind, tuple(
            (display.get(id(p), f"{name}.{i}"), p) for i, p in enumerate(params))))
    return specs


def _clean(name: str) -> str:
    """Drop wrapper segments anywhere and PEFT's leading ``base_model.model.``."""
    cleaned = ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)
    return cleaned[len(_PEFT_ROOT):] if cleaned.startswith(_PEFT_ROOT) else cleaned


def _module_key(name: str) -> str:
    """The matrix a parameter belongs to: its module, or itself for bare (e.g. 3-D expert) ones."""
    head, _, last = name.rpartition(".")
    if last in ("weight", "bias") and head:
        return head
    for suffix in ("_weight", "_bias"):
        # nn.MultiheadAttention's in_proj_weight/in_proj_bias, GPT-OSS's experts.down_proj_bias
        if last.endswith(suffix) and len(last) > len(suffix):
            return name[: -len(suffix)]
    return name


def _lookup(key: str) -> Optional[str]:
    """Kind of the longest table tail that ends ``key``, or None."""
    segments = ["*" if s.isdigit() else s for s in key.split(".")]
    for i in range(len(segments)):
        kind = _PROJECTIONS.get(".".join(segments[i:]))
        if kind is not None:
            return kind
    return None


def _default_kind(key: str) -> Optional[str]:
    return _lookup(key) if _LAYER_RE.search(key) else None


def _adapter_hosts(model: nn.Module) -> dict:
    """``{module path: (base child name, adapter container names)}`` for PEFT wrapper layers.

    Duck-typed so the core never imports peft: a tuner layer (``BaseTunerLayer``) has a
    ``base_layer`` child and declares its tensors in ``adapter_layer_names``; a
    ``ModulesToSaveWrapper`` has ``original_module`` and ``modules_to_save``.
    """
    hosts = {}
    for path, module in model.named_modules():
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            hosts[path] = ("base_layer", tuple(getattr(module, "adapter_layer_names", ())))
        elif isinstance(getattr(module, "original_module", None), nn.Module) and isinstance(
                getattr(module, "modules_to_save", None), nn.ModuleDict):
            hosts[path] = ("original_module", ("modules_to_save",))
    return hosts


# DeBERTa v1's fused ``in_proj`` has no bias; its q and v biases are separate parameters of the
# attention module. They are part of that matrix, so they join its component.
_SPLIT_BIASES = ("q_bias", "v_bias")


def _split_bias_hosts(model: nn.Module) -> dict:
    """``{module path: fused child}`` for modules whose fused projection keeps its biases apart."""
    return {path: "in_proj" for path, module in model.named_modules()
            if isinstance(getattr(module, "in_proj", None), nn.Module)
            and all(isinstance(getattr(module, b, None), nn.Parameter) for b in _SPLIT_BIASES)}


def _place(name: str, hosts: dict, split: dict):
    """``(raw key, is adapter tensor)`` for a parameter name, or None for a PEFT base weight."""
    segments = name.split(".")
    head = ".".join(segments[:-1])
    if segments[-1] in _SPLIT_BIASES and head in split:
        return f"{head}.{split[head]}", False
    for i in range(len(segments) - 1, 0, -1):
        host = ".".join(segments[:i])
        if host in hosts:
            base, adapter_names = hosts[host]
            if segments[i] == base:
                return None
            return host, segments[i] in adapter_names
    return _module_key(name), False


def _resolve_matcher(matcher) -> Callable[[str], Optional[str]]:
    if matcher is None:
        return _default_kind
    if isinstance(matcher, str):
        try:
            matcher = re.compile(matcher)
        except re.error as exc:
            raise ValueError(f"Invalid matcher: {matcher!r} is not a valid regex ({exc})") from exc
    if isinstance(matcher, re.Pattern):
        pattern = matcher
        return lambda key: infer_kind(key) if pattern.search(key) else None
    if callable(matcher):
        user = matcher

        def call(key: str) -> Optional[str]:
            result = user(key)
            if result is None or result is False or result == "":
                return None
            if result is True:
                return infer_kind(key)
            if isinstance(result, str):
                if result not in KINDS:
                    raise ValueError(f"Invalid matcher: returned kind {result!r} for {key!r}; expected one of "
                                     f"{KINDS}, True or a falsy value")
                return result
            raise TypeError(f"Invalid matcher: returned {type(result).__name__} for {key!r}; expected a kind "
                            "str, True or a falsy value")
        return call
    raise TypeError(f"Invalid matcher: expected a regex str, a compiled pattern or a callable, "
                    f"got {type(matcher).__name__}")


def _entry_params(name: str, value) -> list:
    if isinstance(value, nn.Parameter):
        params = [value]
    elif isinstance(value, nn.Module):
        params = [p for p in value.parameters() if p.requires_grad]
    elif isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Iterable):
        raise TypeError(f"Invalid components: entry {name!r} must be a Parameter, a Module, an iterable of "
                        f"Parameters or (kind, one of those); got {type(value).__name__}")
    else:
        params = list(value)
        for p in params:
            if not isinstance(p, nn.Parameter):
                raise TypeError(f"Invalid components: entry {name!r} holds a {type(p).__name__}, "
                                "expected nn.Parameter")
    unique = list({id(p): p for p in params}.values())
    if not unique:
        raise ValueError(f"Invalid components: entry {name!r} has no parameters"
                         + (" with requires_grad=True" if isinstance(value, nn.Module) else ""))
    return unique


def _no_match_message(model: nn.Module, examined: list, matcher) -> str:
    what = f"matcher={matcher!r} matched" if matcher is not None else "the default matcher found"
    searched = (f"{len(examined)} trainable parameters" if examined
                else "no parameters with requires_grad=True")
    text = f"No components: {what} no projection matrix in {type(model).__name__} ({searched} examined). "
    if matcher is None:
        text += (f"A projection must lie inside a numbered layer container "
                 f"({', '.join('.%s.N.' % c for c in _LAYER_CONTAINERS)}) and end in a known projection "
                 f"name (e.g. {', '.join(_ATTENTION[:4] + _MLP[:3])}, query_key_value, c_attn, fc1, "
                 "SelfAttention.q, ...). ")
    if examined:
        text += f"Example trainable parameters: {', '.join(examined[:5])}. "
    return text + ("Pass matcher= (a regex or a callable over module paths such as "
                   "'model.layers.0.self_attn.q_proj') or components= (an explicit {name: parameters} mapping).")
