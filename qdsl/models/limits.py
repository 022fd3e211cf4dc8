"""How long a sequence a model or artifact can run, read from its config files before
anything is loaded, and fitting the commands' lengths (context, calibration window,
cache) to it.

A float model runs as many tokens as its position table holds (config ``n_positions``
/ ``max_position_embeddings``). A compiled generate-mode graph has a static key/value
cache of ``max_cache_len`` slots and runs ``max_cache_len - 1`` tokens
(``qdsl.runtime.graphlm.GraphLM``); compile never makes the cache larger than the positions.
stdlib-gpt2: 256 positions; its artifacts (cache 256) run 255 tokens.

A length left to its default is clipped to the limit with a one-line warning; a length
the user gave that does not fit is an ``OptionError`` naming the option and the limit.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError, ModelError, OptionError
from . import zoo

log = logging.getLogger(__name__)

ARTIFACT_MARKER = "qdsl_artifact.json"   # qdsl.artifact.store.MARKER
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
BLOCK_KEYS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers")
# generate-mode graphs (qdsl compile, bench's fp32 graph row): the static key/value
# cache's slots when none is given (context + new tokens must fit), fitted to the model
DEFAULT_MAX_CACHE_LEN = 1024


@dataclass(frozen=True)
class Limit:
    """At most ``tokens`` tokens in one sequence, because ``why`` (ends a sentence:
    'the model has 256 positions')."""

    tokens: int
    why: str


def _first_count(config, keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` that ``config`` (a config.json dict or a transformers
    config object) sets to a positive integer, else None."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    for key in keys:
        v = get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def positions_of_config(config) -> int | None:
    """The position-table size a config (dict or object) states (None if none)."""
    return _first_count(config, POSITION_KEYS)


def blocks_of_config(config) -> int | None:
    """The number of transformer blocks a config (dict or object) states (None if none)."""
    return _first_count(config, BLOCK_KEYS)


def check_block(option: str, block: int, n_blocks: int | None) -> None:
    """An ``OptionError`` naming the valid range unless ``0 <= block < n_blocks``."""
    if n_blocks is not None and not 0 <= block < n_blocks:
        raise OptionError(f"{option} {block}: the model has {n_blocks} blocks, "
                          f"numbered 0 to {n_blocks - 1}")


def model_blocks(name_or_path: str | os.PathLike) -> int | None:
    """The number of blocks of a model (short name, directory or hub id), from its
    config.json, without loading it."""
    d = zoo.resolve_model(name_or_path).path
    return blocks_of_config(_read_json(Path(d) / "config.json", "model config", ModelError))


def _read_json(path: Path, what: str, error: type) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"{path}: unreadable {what}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: {what} is not a JSON object")
    return data


def model_limit(name_or_path: str | os.PathLike) -> Limit | None:
    """The positions of a model (short name, directory or hub id), from its config.json."""
    d = zoo.resolve_model(name_or_path).path
    n = positions_of_config(_read_json(Path(d) / "config.json", "model config", ModelError))
    return Limit(n, f"the model has {n} positions") if n else None


def artifact_limit(path: str | os.PathLike) -> Limit | None:
    """What a compiled artifact's graph runs: its static cache less one slot, and no
    more than its source model's positions."""
    path = Path(path)
    meta = _read_json(path / ARTIFACT_MARKER, ARTIFACT_MARKER, ArtifactError)
    cache = meta.get("max_cache_len")
    limits = []
    # a missing or malformed value is left to the artifact loader to report
    if isinstance(cache, int) and not isinstance(cache, bool) and cache >= 2:
        limits.append(Limit(cache - 1, f"the artifact's graph caches {cache - 1} tokens"))
    own = path / "model" / "config.json"
    if own.is_file():
        n = positions_of_config(_read_json(own, "model config", ArtifactError))
        if n:
            limits.append(Limit(n, f"the model has {n} positions"))
    return min(limits, key=lambda lim: lim.tokens, default=None)


def limit_of(name_or_path: str | os.PathLike) -> Limit | None:
    """``artifact_limit`` for an artifact directory, else ``model_limit``."""
    if (Path(name_or_path) / ARTIFACT_MARKER).is_file():
        return artifact_limit(name_or_path)
    return model_limit(name_or_path)


def tightest(*limits: Limit | None) -> Limit | None:
    return min((lim for lim in limits if lim is not None), key=lambda lim: lim.tokens,
               default=None)


def fit_length(option: str, value: int | None, default: int, limit: Limit | None,
               *, reserve: int = 0, reserved_for: str = "") -> int:
    """The length to use for ``option``: ``value`` if given (an ``OptionError`` if it
    does not fit), else ``default`` clipped to the limit with a warning.

    ``reserve`` tokens of the limit are taken by something else in the same sequence
    (the decoded tokens after a prefill). Example: --context left at 512 on stdlib-gpt2
    (256 positions) with 32 decode tokens, reserve 33 -> 223 and the warning
    '--context clipped to 223 tokens (default 512): the model has 256 positions
    (33 kept for ...)'.
    """
    if limit is None:
        return default if value is None else value
    room = limit.tokens - reserve
    kept = f" ({reserve} kept for {reserved_for})" if reserve else ""
    if room < 1:
        raise OptionError(f"{option}: nothing fits: {limit.why}{kept}")
    if value is not None:
        if value > room:
            raise OptionError(f"{option} {value} does not fit: {limit.why}{kept}; "
                              f"use {room} or less")
        return value
    if default > room:
        log.warning("%s clipped to %d tokens (default %d): %s%s", option, room, default,
                    limit.why, kept)
        return room
    return default
