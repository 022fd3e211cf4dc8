"""Whether an artifact fits the model it is loaded against: the recorded source
model found on this machine (never downloaded), its content hash, and plan.json
re-derived from the recorded recipe. Failures are one ``ArtifactError``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..artifact.store import module_hash
from ..config.recipe import Loc, Recipe
from ..errors import ArtifactError, QdslError
from ..models.zoo import SHORT_NAMES
from ..plan import QuantPlan, build_plan


def local_source(model_id: str, path) -> str:
    """An artifact's recorded source model if it is on this machine (a short name, a
    directory, a hub snapshot already in the cache); never downloads: loading an
    artifact must not fetch what a file in it names."""
    if model_id.lower() in SHORT_NAMES or Path(model_id).expanduser().is_dir():
        return model_id
    if model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model_id, local_files_only=True)
        except Exception:  # not cached (or no huggingface_hub): refused below
            pass
    raise ArtifactError(
        f"artifact {path} was compiled from {model_id!r}, which is not a short name or a "
        "model directory on this machine (loading an artifact never downloads a model); "
        "pass the source model: --baseline DIR, or qdsl.load(path, model=DIR)")


@contextmanager
def artifact_errors(path, what: str):
    """Failures while applying an artifact's stored parameters -> one ArtifactError
    ``artifact PATH: WHAT: the failure``."""
    try:
        yield
    except ArtifactError:
        raise
    except (QdslError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ArtifactError(f"artifact {path}: {what}: {type(e).__name__}: "
                            f"{str(e)[:200]}") from None


def plan_of(path, meta: dict, plan_json: dict, named, same_model: bool) -> QuantPlan:
    """plan.json as a QuantPlan that fits ``named`` and is exactly what the recorded
    recipe gives on it (the cross-check of plan and recipe)."""
    with artifact_errors(path, "plan.json does not fit the model"):
        plan = QuantPlan.from_json(plan_json)
        plan.check_graph(named, same_model=same_model)
        recorded = Recipe.from_json(meta["recipe"]["rules"])
        # locations point into the compiling machine's files: never read them here
        rules = tuple(replace(r, loc=Loc("<artifact>", r.loc.line, r.loc.col))
                      for r in recorded.rules)
        again = build_plan(Recipe(rules, recorded.settings, source="<artifact>"), named)
    for got, want in zip(plan.entries, again.entries):
        if got != want:
            raise ArtifactError(f"artifact {path}: plan.json does not agree with the recipe "
                                f"recorded in qdsl_artifact.json at node {got.name}")
    if len(plan.entries) != len(again.entries):
        raise ArtifactError(f"artifact {path}: plan.json has {len(plan.entries)} nodes, the "
                            f"recorded recipe plans {len(again.entries)}")
    return plan


def check_source(m, meta: dict, path) -> str:
    """``m``'s content hash, if it is the model the artifact at ``path`` was compiled
    from; else an ArtifactError naming both."""
    got = module_hash(m)
    if got != meta["model"]["hash"]:
        raise ArtifactError(
            f"artifact {path} was compiled from model {meta['model']['id']!r} "
            f"(hash {meta['model']['hash']}), not this one (hash {got}); "
            "load it against the model it was compiled from")
    return got
