"""The op tables: which aten ops mean what, in one place.

Two ways to name an op. ``opname(node)`` is the overload packet's short name
(``aten.view.default`` -> ``"view"``), what the graph analysis (``roles``,
``naming``) matches, whatever the overload. ``aten_name(node)`` is the full overload
(``"aten.view.default"``), what the passes match when an overload's argument
positions matter (``lower_int8``, ``fuse_attention``, ``simplify``).

The view sets differ on purpose: each lists what one walk may step over without
changing what it looks for (see each comment); do not merge them.
"""

from __future__ import annotations

from torch.fx import Node

# op name -> (input arg, weight arg, bias arg, weight layout)
WEIGHTED_OPS: dict[str, tuple[int, int, int | None, str | None]] = {
    "linear": (0, 1, 2, "out_in"),     # y = x W^T + b, W: [out, in]
    "addmm": (1, 2, 0, "in_out"),      # Conv1D: y = b + x W, W: [in, out]
    "embedding": (1, 0, None, None),   # y = W[ids]
}
# the same rows by overload (lower_int8): op -> (input, weight, bias, weight stored [in, out]?)
WEIGHTED_ATEN_OPS: dict[str, tuple[int, int, int | None, bool]] = {
    f"aten.{op}.default": (i, w, b, layout == "in_out")
    for op, (i, w, b, layout) in WEIGHTED_OPS.items()}
NORM_OPS = {"layer_norm": "layer_norm", "native_layer_norm": "layer_norm", "rms_norm": "rms_norm"}
SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax"}
MATMUL_OPS = {"matmul", "bmm", "baddbmm"}
# ops that neither change a value's meaning nor its shape
PASSTHROUGH_OPS = {"to", "_to_copy", "alias", "clone", "dropout", "contiguous", "detach",
                   "type_as", "native_dropout"}
# ops allowed between Q x K^T and softmax (scale, mask, soft-capping)
SCORE_OPS = PASSTHROUGH_OPS | {"mul", "div", "add", "sub", "where", "masked_fill", "tanh"}
NONLINEAR_OPS = {"gelu", "silu", "relu", "tanh", "sigmoid", "erf", "elu", "mish", "hardswish"}

# naming: from an embedding's indices back to the graph input (token ids): any op that
# keeps the ids' values (reshape, broadcast, a slice of positions) may sit between
INDEX_VIEWS = {"view", "reshape", "unsqueeze", "expand", "to", "_to_copy", "alias", "clone",
               "contiguous", "squeeze", "slice"}
# lower_int8: between an activation quantizer and the linear reading it (GPT-2 Conv1D:
# view(x, [-1, d])); only ops that keep every row's values in order, so a per-token
# scale still belongs to the row it was computed for (no expand, transpose, slice)
LINEAR_INPUT_VIEWS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                      "aten.alias.default", "aten.contiguous.default", "aten.clone.default",
                      "aten.flatten.using_ints"}
# fuse_attention: the view chains of a replaced attention (q / k / v reshaped and
# transposed, GQA's repeated key/value) erased once nothing reads them
ATTENTION_VIEWS = {"aten.transpose.int", "aten.reshape.default", "aten.view.default",
                   "aten.expand.default", "aten.unsqueeze.default"}
# torch.export's shape / dtype assertion: no value, dropped when nothing reads it
ASSERT_OP = "aten._assert_tensor_metadata.default"
# call_module targets of fused attentions (passes.fuse_attention): one per attention, in
# its block's scope, where the eager chain's softmax was
FUSED_ATTENTION_PREFIX = "qdsl_attn__"


def opname(node: Node) -> str:
    """``aten.linear.default`` -> ``"linear"``; builtins by name; "" for non-calls."""
    if node.op != "call_function":
        return ""
    packet = getattr(node.target, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))
    return name.split(".")[-1]


def aten_name(node: object) -> str:
    """A ``call_function`` node's full overload name (``"aten.view.default"``), else ""
    (any other node, or not a node at all)."""
    return str(node.target) if isinstance(node, Node) and node.op == "call_function" else ""
