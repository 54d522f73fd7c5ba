"""Packaging for grades_optim: the one metadata source (the version lives in grades_optim/__init__.py)."""
import pathlib
import re

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "grades_optim" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="grades-optim",
    version=VERSION,
    description="GradES: per-matrix gradient-based early stopping as a drop-in torch optimizer wrapper",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `kernels/` ships as `grades_optim.kernels`: a PyPI package named `kernels` exists and
    # transformers imports it when present, so a top-level `kernels` would collide (DESIGN §2).
    packages=find_packages(include=["grades_optim", "grades_optim.*"]) + ["grades_optim.kernels"],
    package_dir={"grades_optim.kernels": "kernels"},
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.46", "accelerate>=1.0", "peft>=0.13", "tqdm", "matplotlib"],
        "lightning": ["lightning>=2.4"],
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["grades-optim=grades_optim.cli:main"]},
)
