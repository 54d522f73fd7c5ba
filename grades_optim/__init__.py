"""grades_optim: GradES (arXiv 2509.01842) as a drop-in torch optimizer wrapper.

Each attention/MLP projection matrix is watched through its gradient magnitude and frozen alone
once it converges; when all are frozen, training can stop without validation passes.
"""
__version__ = "0.1.0"

from .components import Component, discover_components  # noqa: E402
from .optimizer import CheckRecord, GradESOptimizer  # noqa: E402

__all__ = ["GradESOptimizer", "Component", "CheckRecord", "discover_components", "__version__"]
