"""Per-layer activation statistics behind the sweep's Fig. 6b / 6c plots.

The float model is captured once per loaded model (kept in its
``qdsl.study.jobs.LoadedModel.float_ref``; generate mode, the compiled models' cache
length) with a ``Recorder`` (``qdsl.passes.record``) after every residual sum and
linear output of every block. On the layer windows (the ends of the first benchmark
contexts) it gives max |x| per layer and window (Fig. 6b) and each layer's output on
window 0; a quantized model, recorded the same way on window 0, gives its relative
error per layer against those outputs (Fig. 6c). Torch and the graph passes are
imported inside the functions: the sweep command imports this module to parse its
arguments, which must not load torch.
"""

from __future__ import annotations

from .jobs import LoadedModel, SweepConfig, cache_len


def layer_windows(tok, samples, cfg: SweepConfig):
    """[1, T] token windows for layer statistics: the ends of the first samples' contexts."""
    import torch

    out = []
    for s in samples[:cfg.layer_windows]:
        ids = tok(s.context, add_special_tokens=False)["input_ids"][-cfg.layer_tokens:]
        if len(ids) >= 2:
            out.append(torch.tensor([ids], dtype=torch.long))
    return out


def float_reference(cfg: SweepConfig, windows, loaded: LoadedModel) -> dict:
    """Float graph's recorded activations: max |x| per layer over every window, and
    each layer's output on window 0 (the fixed input for relative errors).

    Requires: ``loaded`` is ``cfg.model`` and ``windows`` are ``layer_windows``'s.
    Guarantees: measured once per (windows, tokens) setting and kept on ``loaded``."""
    ref_key = (cfg.layer_windows, cfg.layer_tokens)
    if ref_key not in loaded.float_ref:
        from ..graph.capture import capture
        from ..runtime.graphlm import GraphLM
        from ..graph.naming import name_graph
        from ..passes.pipeline import FEED, RECORD, Feed, PassContext, run
        from ..passes.record import recorded_names

        graph_cache = cache_len(cfg, loaded.max_pos)
        captured = capture(loaded.model, mode="generate", max_cache_len=graph_cache)
        named = name_graph(captured)
        names = recorded_names(named)
        lm = GraphLM(captured.gm, graph_cache)
        # window 0 alone first: its outputs are the reference; then the rest
        ctx = PassContext(named, record_names=names, feed=Feed(lm.logits, windows[:1]))
        run(RECORD, captured.gm, ctx)
        recs = ctx.recorders
        outputs = {n: recs[n].last for n in names}
        ctx.feed = Feed(lm.logits, windows[1:])
        run(FEED, captured.gm, ctx)
        loaded.float_ref[ref_key] = {"names": names, "outputs": outputs,
                              "max_abs": {n: recs[n].max_abs for n in names}}
        del captured, lm, recs, ctx
    return loaded.float_ref[ref_key]


def layer_stats(qm, cfg: SweepConfig, windows, loaded: LoadedModel) -> dict:
    """Per recorded layer: the quantized model's max |x| and relative error vs float on
    window 0 (the float reference of ``loaded``, the model ``qm`` was compiled from)."""
    from ..runtime.graphlm import GraphLM
    from ..passes.pipeline import RECORD, Feed, PassContext, run
    from ..passes.record import relative_error

    ref = float_reference(cfg, windows, loaded)
    ctx = PassContext(qm.named, record_names=ref["names"],
                      feed=Feed(GraphLM(qm.gm, qm.max_cache_len).logits, windows[:1]))
    run(RECORD, qm.gm, ctx)
    recs = ctx.recorders
    return {n: {"max_abs": recs[n].max_abs[0],
                "rel_err": relative_error(recs[n].last, ref["outputs"][n])}
            for n in ref["names"]}
