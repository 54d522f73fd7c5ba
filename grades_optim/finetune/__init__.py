"""The main job: fine-tune a local Hugging Face model three ways (full, classic early stopping,
GradES) on identical data, seed and hyperparameters, and write a report folder.

Depends on transformers/tqdm/matplotlib (the ``hf`` extra); the core library never imports this.
"""
from .config import METHODS, FinetuneConfig
from .errors import DatasetError, FinetuneError, ModelError, OutputError
from .runner import run_finetune

__all__ = ["FinetuneConfig", "METHODS", "run_finetune", "FinetuneError", "DatasetError", "ModelError",
           "OutputError"]
