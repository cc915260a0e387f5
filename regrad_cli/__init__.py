"""regrad: Retrievable Gradients (ReGrad) as a command-line toolkit and a Python library.

Importing this package is cheap: torch, transformers, sentence-transformers and lancedb are
imported inside the functions that need them, so ``regrad --help`` stays fast in shell pipelines.
"""

__version__ = "0.1.0"

from regrad_cli.errors import FieldError, RegradError  # noqa: E402

__all__ = ["__version__", "Regrad", "RegradError", "FieldError"]


def __getattr__(name):
    # ``from regrad_cli import Regrad`` without importing anything heavy until it is used.
    if name == "Regrad":
        from regrad_cli.api import Regrad

        return Regrad
    raise AttributeError(f"module 'regrad_cli' has no attribute {name!r}")
