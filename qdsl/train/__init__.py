"""Quantization-aware distillation (``qdsl train``, XTC / de Moor 2023).

``qat`` puts the recipe's quantizers into an eager student (weights through a
parametrization, the activations that feed weighted modules through pre-hooks, all
with straight-through gradients); ``loss`` is XTC's distillation loss; ``data`` the
token stream and batches; ``checkpoint`` the resumable state (safetensors + JSON);
``loop`` the training driver that ends in an ordinary qdsl artifact.
"""
