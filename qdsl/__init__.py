"""qdsl: a declarative quantization-recipe language and graph compiler for PyTorch models."""

__version__ = "0.1.0"
