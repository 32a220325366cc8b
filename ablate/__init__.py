"""ablate: ablation experiments on memory-augmented language models."""

__version__ = "0.1.0"

from ablate.api.hookspecs import hookimpl  # noqa: E402  (the decorator plugins use)

__all__ = ["hookimpl", "__version__"]
