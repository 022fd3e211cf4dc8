"""The report of a ``qdsl bench`` run (``qdsl.eval.hosting.run_bench``'s result):
the cost of a prediction, the Markdown table, the size-vs-latency plot. Reads the
result dict only; measures nothing.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from qdsl.atomic import atomic_path


def cost(row: dict, cfg: dict) -> dict:
    """Per 1k predictions (context prefill + ``pred_tokens`` decode steps): s, Wh, $."""
    s = (row["prefill_ms"] + cfg["pred_tokens"] * row["decode_ms"]) / 1e3
    wh = cfg["power_watts"] * s * 1000 / 3600
    return {"s_per_pred": s, "wh_per_1k": wh, "usd_per_1k": wh / 1000 * cfg["price_per_kwh"]}


def _bandwidth(result: dict) -> float | None:
    """The machine's read bandwidth (GB/s): the highest any measured row's children
    read, so every row's bound is the same strict one."""
    bws = [r["extra"]["bandwidth_gbs"] for r in result["rows"] if r["extra"].get("bandwidth_gbs")]
    return max(bws) if bws else None


def bound_ms(row: dict, bandwidth: float | None) -> float | None:
    """Decode's bandwidth bound: weight bytes read per token / read bandwidth (ms), with
    the run's highest bandwidth (``bandwidth``) so that rows compare on one figure."""
    nbytes = row["extra"].get("weight_bytes_per_token")
    bw = bandwidth or row["extra"].get("bandwidth_gbs")     # one figure for every row
    return nbytes / (bw * 1e9) * 1e3 if nbytes and bw else None


def markdown(result: dict) -> str:
    cfg, rows, cond = result["config"], result["rows"], result["conditions"]
    base = rows[0]
    fp16 = base["extra"].get("fp16_size_mb")
    bw = _bandwidth(result)

    def ratio(v, b):
        return f" ({v / b:.2f}x)" if v is not None and b else ""

    def mb(v):
        return "-" if v is None else f"{v:.0f}"

    machine = (f"CPU capability {cond['capability_text']}" if "capability_text" in cond
               else "")
    if bw:
        machine += (f"; read bandwidth {bw:.1f} GB/s ({cfg['threads']} thread(s), the highest "
                    "torch.sum over fresh 256 MiB buffers)")
    out = [f"Model `{result['model']}`; context {cfg['context']} tokens, decode "
           f"{cfg['decode_tokens']} tokens x {cfg['repeats']} repeats x {cfg['rounds']} rounds "
           f"(medians, after warm-up, models interleaved), "
           f"{cfg['threads']} thread(s), torch {cond['torch']}, "
           f"load average {', '.join(f'{x:.1f}' for x in cond['load_avg'])}.",
           *([machine + "."] if machine else []),
           "",
           "| model | file MB | RSS after load MB | peak RSS MB | prefill ms | decode ms/token "
           "| decode / bandwidth bound | vs fp32 graph (prefill / decode) | tokens/s | s/pred "
           "| Wh / 1k pred | $ / 1k pred |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    graph = next((r for r in rows if r["kind"] == "fp32-graph"), None)
    for r in rows:
        c = cost(r, cfg)
        size = "-" if r["size_mb"] is None else f"{r['size_mb']:.1f}{ratio(r['size_mb'], base['size_mb'])}"
        vs = "-" if graph is None else (f"{r['prefill_ms'] / graph['prefill_ms']:.2f}x / "
                                        f"{r['decode_ms'] / graph['decode_ms']:.2f}x")
        b = bound_ms(r, bw)
        bound = "-" if b is None else f"{r['decode_ms'] / b:.2f}x of {b:.2f} ms"
        peak = "-" if r["peak_rss_mb"] is None else \
            f"{r['peak_rss_mb']:.0f}{ratio(r['peak_rss_mb'], base['peak_rss_mb'])}"
        out.append(f"| {r['name']} | {size} | {mb(r['rss_load_mb'])} | {peak} | "
                   f"{r['prefill_ms']:.1f}{ratio(r['prefill_ms'], base['prefill_ms'])} | "
                   f"{r['decode_ms']:.2f}{ratio(r['decode_ms'], base['decode_ms'])} | {bound} | "
                   f"{vs} | {r['tokens_per_s']:.1f} | {c['s_per_pred']:.2f} | "
                   f"{c['wh_per_1k']:.1f} | {c['usd_per_1k']:.4f} |")
    if fp16:
        out.append(f"\nfp16 file size (computed, 2 bytes/parameter): {fp16:.1f} MB "
                   f"({fp16 / base['size_mb']:.2f}x).")
    out.append("Bandwidth bound: the weight bytes a decode step reads (gather-only embedding "
               "tables excluded) / the read bandwidth; 1.00x is the fastest any kernel can go.")
    out += _cache_lines(rows, bw)
    out += _round_lines(rows, cfg)
    out += _kernel_lines(rows)
    out.append(f"Cost: a prediction = prefill of the context + {cfg['pred_tokens']} decode steps "
               f"(Wei et al. Table 2 generate 20 tokens); assumed {cfg['power_watts']:g} W and "
               f"${cfg['price_per_kwh']:g}/kWh.")
    return "\n".join(out)


def _cache_lines(rows: list[dict], bandwidth: float | None) -> list[str]:
    """The key/value cache a graph row's decode step reads (not in the bound: gpt-fast's
    convention counts weights only), and the bound with it counted."""
    parts = []
    for r in rows:
        kv = r["extra"].get("kv_bytes_per_token")
        if not kv:
            continue
        text = f"{r['name']} {kv / 1e6:.1f} MB ({r['extra'].get('kv_dtype', '?')})"
        b, bw = bound_ms(r, bandwidth), bandwidth or r["extra"].get("bandwidth_gbs")
        if b is not None and bw:
            with_kv = b + kv / (bw * 1e9) * 1e3
            text += f", decode {r['decode_ms'] / with_kv:.2f}x of the bound with it"
        parts.append(text)
    return ["Key/value cache read per decode step (mean over the timed steps): "
            + "; ".join(parts) + "."] if parts else []


def _round_lines(rows: list[dict], cfg: dict) -> list[str]:
    """Decode per round (each a fresh process), so that a reader sees how far one
    process's figure moves; with one round, a warning that it cannot show that."""
    if cfg.get("rounds", 1) < 2:
        return ["One round (one fresh process per model): decode can differ between "
                "processes by more than a 5% effect (huge-page placement, the host); "
                "measure with --rounds 3 or more before reading a ratio from one row."]
    parts = []
    for r in rows:
        per = [statistics.median(x["decode_all_ms"]) for x in r["extra"].get("runs") or []
               if x.get("decode_all_ms")]
        if len(per) >= 2:
            parts.append(f"{r['name']} " + " / ".join(f"{v:.2f}" for v in per)
                         + f" ms (max/min {max(per) / min(per):.2f})")
    return ["Decode per round (each a fresh process; median of its repeats): "
            + "; ".join(parts) + "."] if parts else []


def _kernel_lines(rows: list[dict]) -> list[str]:
    """What the qdsl rows ran, per operation and shape class (qdsl.runtime.kernels)."""
    out = []
    for r in rows:
        chosen = r["extra"].get("kernels")
        if not chosen:
            continue
        parts = [f"{k} {name}" + (" (dequantize + float GEMM: no integer kernel is faster "
                                  "on this CPU)" if name == "float_gemm" else "")
                 for k, name in sorted(chosen.items())]
        out.append(f"Kernels of {r['name']}: " + "; ".join(parts) + ".")
    for r in rows:
        runs = r["extra"].get("runs") or [{}]
        if "compile_s" not in runs[0]:
            continue
        failed = [x["compile_failed"] for x in runs if x.get("compile_failed")]
        secs = ", ".join(f"{x['compile_s']:.1f}" for x in runs if x.get("compile_s") is not None)
        huge = runs[0].get("huge_pages_mb")
        wrapper = {"cpp": "C++ wrapper", "python": "Python wrapper",
                   "fused": "one fused C++ call a step (llama_decode_step)"
                   }.get(runs[0].get("wrapper") or "")
        out.append(f"{r['name']}: " + (f"compiling failed, decoded eager ({failed[0]})"
                                        if failed else f"first decode step (trace + compile "
                                        f"or cache load) {secs} s per process"
                                        + (f", {wrapper}" if wrapper else ""))
                   + (f"; weights and caches on huge pages ({huge:.0f} MiB)" if huge
                      else "; weights and caches on 4 KiB pages" if huge is not None else "")
                   + ".")
    return out


def plot(result: dict, path: str | os.PathLike) -> None:
    """File size against decode latency, one labelled point per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        if r["size_mb"] is None:
            continue
        ax.scatter(r["decode_ms"], r["size_mb"], s=40)
        ax.annotate(r["name"], (r["decode_ms"], r["size_mb"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("decode latency per token (ms, batch 1, KV cache)")
    ax.set_ylabel("file size on disk (MB)")
    ax.set_title(f"{result['model']}: size vs decode latency", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp" + Path(path).suffix) as tmp:  # savefig reads it
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
