"""Quantizer maths: stateless primitives (``choose_qparams``, ``quantize``,
``dequantize``, ``fake_quantize``, group views) and the calibration observers."""
