"""A sweep's cache, read back: ``DIR/cache/<key>.json`` holds one finished job each
(``qdsl.study.sweepjob`` writes it). Every entry is checked before the reports use it: a
file that is not JSON, not an object, of another job, or missing a field the reports
read (or holding one of the wrong type) is named in a warning and left out, so its
job runs again (with ``--report``, which runs nothing, its rows show as not run).
NaN / Infinity written by older versions are read as null (standard JSON has neither;
``qdsl.atomic.write_json_atomic`` writes them as null).

Where the entries live (``CacheStore``): a local directory (``DIR/cache`` by default) or
an fsspec URL (``s3://bucket/qdsl-cache``, ``gs://...``, ``file:///nfs/...``), so that every
worker of a cluster sees the same cache. An entry is written whole or not at all: to a
temporary name beside it, then renamed (``os.replace`` locally; on an object store the
rename is a copy of one small object, and a reader sees the old object or the new one).
A temporary left by a worker that died is never read as an entry.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from ..atomic import finite, write_json_atomic

log = logging.getLogger(__name__)

# Field -> JSON type the reports (qdsl.study.tables, qdsl.study.findings, qdsl.study.plots) read it as;
# "?" also allows null (an empty measurement). Required for every entry / per kind:
REQUIRED = {
    "*": {"kind": "str", "recipe": "str?", "bits": "str"},
    "quality": {"n": "int", "es": "num?", "em": "num?", "samples": "list"},
    "robust": {"robust": "dict"},
    "humaneval": {"humaneval": "dict"},
}
# checked where present
OPTIONAL = {"key": "str", "seconds": "num?", "ppl": "num?", "bpb": "num?",
            "compression": "num?", "size_mb": "num?", "size_before": "num?",
            "size_after": "num?", "body_before": "num?", "body_after": "num?",
            "body_compression": "num?", "sizes_from": "str", "calib_samples": "int?", "artifact_bytes": "int?",
            "layers": "dict", "bench": "dict", "lower": "str", "peak_rss_bytes": "int?",
            "peak_rss_scope": "str"}
NESTED = {
    "robust": {"n": "int", "es": "num?", "es_perturbed": "num?", "es_drop_pct": "num?",
               "em": "num?", "em_perturbed": "num?", "em_drop_pct": "num?"},
    "humaneval": {"pass@1": "num", "problems": "int"},
}
# list field -> what each item must hold, and may hold (per-sample scores, paired by id)
ITEMS = {"samples": ({"id": "str", "es": "num"}, {}),
         "robust.perturbed_samples": ({"id": "str", "es": "num"}, {"es_clean": "num"}),
         "bench.rows": ({"kind": "str"}, {})}

_NAMES = {"num": "a number", "int": "an integer", "str": "a string", "dict": "an object",
          "list": "a list"}


class BadEntry(ValueError):
    """Why a cache entry cannot be used."""


def _is(value, t: str) -> bool:
    if t.endswith("?"):
        if value is None:
            return True
        t = t[:-1]
    if t in ("num", "int") and isinstance(value, bool):
        return False
    return isinstance(value, {"num": (int, float), "int": int, "str": str, "dict": dict,
                              "list": list}[t])


def _check_fields(obj: dict, fields: dict, where: str, required: bool) -> None:
    for name, t in fields.items():
        if name not in obj:
            if required:
                raise BadEntry(f"no {where}{name!r}")
            continue
        if not _is(obj[name], t):
            raise BadEntry(f"{where}{name!r} is {json.dumps(obj[name])[:40]}, not "
                           f"{_NAMES[t.rstrip('?')]}")


def check_entry(entry, key: str | None = None, kind: str | None = None) -> dict:
    """``entry`` if it is a usable cached job (of ``key`` and ``kind`` where given), else
    ``BadEntry`` saying what is wrong."""
    if not isinstance(entry, dict):
        raise BadEntry(f"a JSON {type(entry).__name__}, not an object")
    _check_fields(entry, REQUIRED["*"], "", True)
    if entry["kind"] not in REQUIRED:
        raise BadEntry(f"unknown kind {entry['kind']!r}")
    if kind is not None and entry["kind"] != kind:
        raise BadEntry(f"a {entry['kind']} job, not a {kind} job")
    if key is not None and entry.get("key", key) != key:
        raise BadEntry(f"the entry of job {entry['key']!r}, not {key!r}")
    _check_fields(entry, REQUIRED[entry["kind"]], "", True)
    _check_fields(entry, OPTIONAL, "", False)
    for name, fields in NESTED.items():
        if name in entry:
            _check_fields(entry[name], fields, f"{name}.", True)
    for path, (fields, optional) in ITEMS.items():
        outer, _, name = path.rpartition(".")
        items = (entry.get(outer) or {}).get(name) if outer else entry.get(name)
        if items is None:
            continue
        if not isinstance(items, list):
            raise BadEntry(f"{path!r} is not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise BadEntry(f"{path}[{i}] is not an object")
            _check_fields(item, fields, f"{path}[{i}].", True)
            _check_fields(item, optional, f"{path}[{i}].", False)
    return entry


def read_entry(path: str | os.PathLike, key: str | None = None,
               kind: str | None = None) -> dict | None:
    """The cached job in ``path`` (None if there is none); ``BadEntry`` if unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise BadEntry(f"unreadable: {getattr(e, 'strerror', None) or e}") from e
    return parse_entry(text, key, kind)


def parse_entry(text: str, key: str | None = None, kind: str | None = None) -> dict:
    """A cache entry's text -> the entry; ``BadEntry`` if unusable."""
    try:   # NaN / Infinity (older caches) -> null
        entry = json.loads(text, parse_constant=lambda _: None)
    except (ValueError, RecursionError) as e:
        raise BadEntry(f"not valid JSON ({str(e)[:80]})") from e
    return check_entry(entry, key, kind)


def is_url(location) -> bool:
    """An fsspec URL (``proto://...``) rather than a local path."""
    return "://" in str(location)


class CacheStore:
    """A sweep's cache: ``<key>.json`` entries in a local directory or at an fsspec URL.
    Pickled as its location alone (it travels to cluster workers)."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self._fs = None

    def __reduce__(self):
        return CacheStore, (self.location,)

    def __repr__(self) -> str:
        return f"CacheStore({self.location!r})"

    @property
    def fs(self):
        """(fsspec filesystem, root path) of a URL; None for a local directory."""
        if self._fs is None and is_url(self.location):
            import fsspec  # a huggingface_hub (so transformers) dependency; only URLs need it

            try:
                self._fs = fsspec.core.url_to_fs(self.location)
            except (ImportError, ValueError) as e:
                raise OSError(f"cache {self.location}: {e}") from e
        return self._fs

    def where(self, key: str) -> str:
        """The entry's path or URL, for messages."""
        return f"{self.location.rstrip('/')}/{key}.json"

    def prepare(self) -> None:
        """Create the directory (an object store needs none)."""
        if self.fs is None:
            Path(self.location).mkdir(parents=True, exist_ok=True)
        else:
            fs, root = self.fs
            fs.makedirs(root, exist_ok=True)

    def read(self, key: str, kind: str | None = None) -> dict | None:
        """The usable entry of ``key`` (None if there is none); ``BadEntry`` if unusable."""
        if self.fs is None:
            return read_entry(Path(self.location) / f"{key}.json", key, kind)
        fs, root = self.fs
        try:
            text = fs.cat_file(f"{root.rstrip('/')}/{key}.json").decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise BadEntry(f"unreadable: {e}") from e
        return parse_entry(text, key, kind)

    def write(self, key: str, entry: dict) -> None:
        """Write ``entry`` whole: a temporary beside it, then renamed over it."""
        if self.fs is None:
            write_json_atomic(Path(self.location) / f"{key}.json", entry)
            return
        fs, root = self.fs
        data = (json.dumps(finite(entry), indent=1, allow_nan=False) + "\n").encode()
        final = f"{root.rstrip('/')}/{key}.json"
        tmp = f"{root.rstrip('/')}/.{key}.json.{uuid.uuid4().hex[:8]}.tmp"
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, final)
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)


def load_cache(cache: str | os.PathLike | CacheStore, kinds: dict[str, str],
               will_run: set[str] = frozenset()) -> dict[str, dict]:
    """key -> cached job for every usable entry of ``kinds`` (key -> job kind) in
    ``cache`` (a directory, URL or ``CacheStore``); each unusable one is named in a
    warning (its job runs again if its key is in ``will_run``, else its rows show as
    not run)."""
    store = cache if isinstance(cache, CacheStore) else CacheStore(cache)
    done = {}
    for key, kind in sorted(kinds.items()):
        path = store.where(key)
        try:
            entry = store.read(key, kind)
        except BadEntry as e:
            what = ("running its job again" if key in will_run
                    else "left out: its rows show as not run")
            log.warning("sweep cache entry %s is unusable (%s); %s", path, e, what)
            continue
        if entry is not None:
            done[key] = entry
    return done
