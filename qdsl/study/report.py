"""The results document (``docs/results.md``): generated blocks inside hand-written prose.

``qdsl sweep ... --doc FILE`` rewrites, from ``DIR/results.json`` and
``DIR/tables.md``, every block of FILE delimited by

    <!-- qdsl:NAME -->
    ...
    <!-- /qdsl:NAME -->

for NAME in ``run`` (command, machine, time), ``tables`` (every measured table) and
``findings`` (``qdsl.study.findings`` verdicts). Text outside the blocks (setup notes,
the discussion) is left as written. A FILE that does not exist yet is created from
a skeleton holding the three blocks. The file is replaced atomically.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import QdslError
from .findings import evaluate, render

BLOCKS = ("run", "tables", "findings")
_BLOCK = re.compile(r"(<!-- qdsl:(\w+) -->\n)(.*?)(<!-- /qdsl:\2 -->)", re.S)

SKELETON = """# Reproducing the seed studies: results

<!-- qdsl:run -->
<!-- /qdsl:run -->

## Findings

<!-- qdsl:findings -->
<!-- /qdsl:findings -->

## Measured tables

<!-- qdsl:tables -->
<!-- /qdsl:tables -->

## Discussion

(Write the discussion here; regenerating leaves it alone.)
"""


def run_block(res: dict, command: str) -> str:
    """How the numbers were made: the command, the machine, the compute time."""
    runs = list(res["runs"].values())
    secs = [r["seconds"] for r in runs if r.get("seconds")]
    m, cfg = res["machine"], res["config"]
    per_job = (f"per job median {statistics.median(secs) / 60:.1f} min "
               f"(min {min(secs) / 60:.1f}, max {max(secs) / 60:.1f})" if secs else "no jobs yet")
    return "\n".join([
        "Regenerate (resumes from the cache; only missing rows run):", "", "```bash",
        command, "```", "",
        f"Model `{cfg['model']}`, bench `{cfg['bench']}` ({res['n_samples']} samples, seed "
        f"{cfg['bench_seed']}), {cfg['ppl_windows']} perplexity windows. Machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, "
        f"{cfg['threads']} torch thread(s) per job. Compute: {len(runs)} finished jobs, "
        f"{res['job_seconds_total'] / 3600:.1f} h of job time, {per_job}. "
        f"Last update {res['updated']}.", ""])


def tables_block(tables_md: str) -> str:
    """DIR/tables.md without its title line and intro paragraph."""
    at = tables_md.find("### ")
    return (tables_md[at:] if at >= 0 else tables_md).rstrip() + "\n"


def findings_of(res: dict) -> list[dict]:
    """The verdicts ``res`` (a results.json) holds, or, for an older one without them,
    the verdicts over its tables (rows without per-sample scores, so those checks read
    "not run yet")."""
    return res.get("findings") or evaluate(res["tables"])


def findings_block(res: dict) -> str:
    """The findings block of a results document (``findings_of``)."""
    return render(findings_of(res), res["n_samples"])


def update_doc(doc: str | Path, results_dir: str | Path, command: str) -> Path:
    """Rewrite the generated blocks of ``doc`` from the sweep in ``results_dir``."""
    doc, d = Path(doc), Path(results_dir)
    try:
        res = json.loads((d / "results.json").read_text(), parse_constant=lambda _: None)
        tables_md = (d / "tables.md").read_text()
    except OSError as e:
        raise QdslError(f"{d}: no sweep results to report ({e.strerror}: {e.filename}); "
                        "run qdsl sweep -o DIR first") from e
    except ValueError as e:
        raise QdslError(f"{d / 'results.json'}: not valid JSON ({str(e)[:80]}); rewrite it "
                        "with qdsl sweep ... --report") from e
    need = ("config", "machine", "runs", "tables", "n_samples", "updated", "job_seconds_total")
    missing = [k for k in need if not isinstance(res, dict) or k not in res]
    if missing:
        raise QdslError(f"{d / 'results.json'}: not a qdsl sweep's results (no "
                        f"{', '.join(missing)}); rewrite it with qdsl sweep ... --report")
    text = doc.read_text() if doc.exists() else SKELETON
    fill = {"run": run_block(res, command), "tables": tables_block(tables_md),
            "findings": findings_block(res)}
    found = {m.group(2) for m in _BLOCK.finditer(text)}
    missing = [b for b in BLOCKS if b not in found]
    if missing:
        raise QdslError(f"{doc}: no generated block(s) {', '.join(missing)}: add "
                        "<!-- qdsl:NAME --> ... <!-- /qdsl:NAME --> markers, or give a new "
                        "file name to start from the skeleton")
    out = _BLOCK.sub(lambda m: m.group(1) + fill.get(m.group(2), m.group(3)) + m.group(4), text)
    write_text_atomic(doc, out)
    return doc
