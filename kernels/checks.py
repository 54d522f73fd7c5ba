"""Argument checks shared by the kernels' launchers and their torch twins (no triton import)."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SUPPORTED_DTYPES", "check_tensor_list"]

# The element types every kernel loads and stores (fp32 accumulation inside).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor_list(name: str, tensors) -> list[torch.Tensor]:
    """``tensors`` as a list, or a ``TypeError`` naming the argument and the offending entry."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a sequence of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] has layout {t.layout}; only dense (strided) tensors are supported")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected one of "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    return list(tensors)
