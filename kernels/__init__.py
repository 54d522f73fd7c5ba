"""Triton kernels for GradES, installed as ``grades_optim.kernels``.

Nothing here imports triton eagerly: the core library must work without it. ``available()``
imports it on demand; the kernel modules (``tensor_sums``) import it at module level, and
``dispatch`` imports them only when the Triton path is taken.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Union

import torch

__all__ = ["available"]

_KERNEL_MODULE = __name__ + ".tensor_sums"


def _interpreting() -> bool:
    # triton decides interpreted-or-compiled when @triton.jit decorates, i.e. when the kernel
    # module is imported; once it is, its answer wins over the current environment.
    mod = sys.modules.get(_KERNEL_MODULE)
    if mod is not None:
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: Optional[Union[str, torch.device]] = None) -> Optional[str]:
    """``None`` if the Triton kernels can run here, else a sentence saying why not.

    ``device=None`` asks whether they can run at all: for CUDA tensors, or for CPU tensors under
    ``TRITON_INTERPRET=1``. With a device it asks about tensors on that device: CUDA tensors need
    triton, a GPU and *no* interpreter (it cannot follow device addresses in the block table);
    CPU tensors need the interpreter. ``impl="auto"`` should use Triton only when
    ``available(tensor.device) is None and tensor.device.type == "cuda"``
    (``dispatch.resolve_impl`` does exactly that).
    """
    try:
        import triton  # noqa: F401  (importability is the question)
    except ImportError as exc:
        return f"triton is not importable ({exc}); install grades-optim[triton]"
    interpreting = _interpreting()
    if device is None:
        if interpreting or torch.cuda.is_available():
            return None
        return "no CUDA device is available and TRITON_INTERPRET=1 is not set"
    device = torch.device(device)
    if device.type == "cuda":
        if interpreting:
            return ("TRITON_INTERPRET=1 runs the kernels on the host, which cannot follow the CUDA "
                    "addresses in their block tables")
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if interpreting:
            return None
        return ("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1, set before "
                f"{_KERNEL_MODULE} is imported")
    return f"there is no Triton path for {device.type} tensors"
