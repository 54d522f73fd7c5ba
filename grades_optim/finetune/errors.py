"""Errors of the fine-tuning job: each carries a message a user can act on (the CLI prints it)."""

__all__ = ["FinetuneError", "DatasetError", "ModelError", "OutputError"]


class FinetuneError(Exception):
    """Base class: bad input or environment for ``grades-optim finetune``."""


class DatasetError(FinetuneError, ValueError):
    """The dataset is missing, unreadable, lacks a column, or has unusable labels."""


class ModelError(FinetuneError, ValueError):
    """The model directory is missing or is not a loadable Hugging Face model."""


class OutputError(FinetuneError, ValueError):
    """The output folder cannot be used (it holds another run, or is not a run folder)."""
