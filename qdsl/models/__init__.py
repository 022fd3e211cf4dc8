"""Models and what they are fed: the model zoo and loaders, the causal-LM interface,
length limits, calibration data and the stdlib corpus.

* ``zoo``: short names, offline model packages, the reference model, ``load_model``.
* ``lm``: ``CausalLM`` (the interface eval scores) and ``HFCausalLM``.
* ``limits``: a model's positions and the lengths that fit them.
* ``calib``: calibration windows from code, a dataset or the stdlib.
* ``stdlib``: the stdlib's deterministic train / valid / test split.
"""
