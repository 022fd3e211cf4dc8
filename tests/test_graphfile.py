"""The stored lowered graph (``graph.json``, ``qdsl.compiler.graphfile``): an int8
artifact's runtime loads it without rebuilding or capturing the model, and runs exactly
what the capture path builds."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.artifact import store
from qdsl.artifact.files import sha256_file
from qdsl.compiler import graphfile, lowered
from qdsl.compiler.graphfile import GRAPH_FILE
from qdsl.compiler.loading import load_artifact_lm
from qdsl.errors import ArtifactError
from qdsl.graph.attrs import graph_tensors
from qdsl.runtime.attention import FusedAttention
from qdsl.runtime.hadamard import OnlineHadamard
from qdsl.runtime.inputs import InputScale
from qdsl.runtime.registry import module_from_json

CACHE = 32
W8A8 = "* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_tensor static\n"
RECIPES = {
    "w8a8_dynamic": "* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_token dynamic\n",
    "w4a8_dynamic": "type:Linear -> w4 sym group(size=32)\n"
                    "type:Linear.input -> a8 sym per_token dynamic\n",
    "1w8a": "type:Linear -> w1 sym per_channel\ntype:Linear.input -> a8 sym per_token dynamic\n"
            "embed -> w4 sym group(size=32)\nlm_head -> w4 sym group(size=32)\n"
            "lm_head.input -> a32\n",
    "rotate_w8a8": W8A8 + "rotate\n",                           # OnlineHadamard
    "awq_w4": "* -> w4 sym group(size=32) awq(clip)\nembed -> rtn\n",   # InputScale
    "simulated": "* -> w8\nblock.*.mlp.down.input -> a8 per_group(K=2)\n",   # FakeQuant kept
}


def _compile(name: str, family: str = "llama"):
    model = tiny(family, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = C.compile(model, RECIPES[name], calib=tiny_ids(model, 4, 16), lower="int8",
                      max_cache_len=CACHE, progress=False, fallback="simulate")
    return model, q


@pytest.fixture(scope="module", params=sorted(RECIPES))
def saved(request, tmp_path_factory):
    model, q = _compile(request.param)
    d = q.save(tmp_path_factory.mktemp(request.param) / "a")
    return request.param, model, q, d


def _no_capture(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the stored graph's load captured the model")
    monkeypatch.setattr(lowered, "capture", refuse)
    monkeypatch.setattr(lowered, "meta_model", refuse)


def test_stored_graph_runs_what_the_capture_builds(saved, monkeypatch):
    name, model, q, d = saved
    assert (d / GRAPH_FILE).is_file()
    types = {type(m).__name__ for m in q.gm.modules()}
    expect = {"rotate_w8a8": "OnlineHadamard", "awq_w4": "InputScale",
              "1w8a": "BinaryDynamicLinear", "w4a8_dynamic": "W4DynamicLinear",
              "simulated": "FakeQuant"}
    assert expect.get(name, "Int8DynamicLinear") in types, types
    ids = tiny_ids(model, 2, 12, seed=7)
    want = q(ids)
    with monkeypatch.context() as m:
        _no_capture(m)
        lm = load_artifact_lm(d)
    assert torch.equal(lm.logits(ids), want)
    assert lm.tokenizer is None and lm.max_cache_len == CACHE
    # the stored graph holds the same nodes, modules and tensors as the captured one
    stored = lm.gm
    assert [n.name for n in stored.graph.nodes] == \
        [n.name for n in q.gm.graph.nodes if n.target != graphfile.GUARDS]
    assert {type(m).__name__ for m in stored.modules()} <= types | {"Module"}
    # parameters, buffers, non-persistent buffers and plain tensor attributes (export's
    # constants: the key/value cache) as the capture made them (the bench's weight bytes
    # skip the cache by that)
    kinds = lambda gm: {k: graphfile._kind(gm, k) for k in graph_tensors(gm)}  # noqa: E731
    assert kinds(stored) == kinds(q.gm)
    assert "attribute" in kinds(stored).values()
    # decoding, token by token through the key/value cache
    lm.prefill(ids[:1, :5])
    again = q.lm()
    again.prefill(ids[:1, :5])
    for t in ids[0, 5:9].tolist():
        assert torch.equal(lm.decode(t), again.decode(t))


def test_another_cache_length_loads_by_capture(saved, monkeypatch):
    name, model, q, d = saved
    calls = []
    real = lowered.capture
    monkeypatch.setattr(lowered, "capture", lambda *a, **k: calls.append(k) or real(*a, **k))
    hashed = []
    real_verify = store.verify_files
    monkeypatch.setattr(store, "verify_files", lambda *a: hashed.append(a) or real_verify(*a))
    lm = load_artifact_lm(d, max_cache_len=CACHE // 2)
    assert calls and calls[0]["max_cache_len"] == CACHE // 2 and lm.max_cache_len == CACHE // 2
    assert len(hashed) == 1        # the files are hashed once, not again by the capture
    ids = tiny_ids(model, 1, 8, seed=3)
    assert torch.equal(lm.logits(ids), q(ids))


def test_the_graph_file_is_verified_like_every_file(saved, tmp_path):
    import shutil
    _, _, _, d = saved
    e = tmp_path / "e"
    shutil.copytree(d, e)
    doc = json.loads((e / GRAPH_FILE).read_text())
    doc["nodes"][-2]["name"] += "x"
    (e / GRAPH_FILE).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="graph.json does not match its recorded hash"):
        load_artifact_lm(e)
    meta = json.loads((e / "qdsl_artifact.json").read_text())
    del meta["files"][GRAPH_FILE]
    (e / "qdsl_artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="graph.json is not recorded"):
        load_artifact_lm(e)


def _edited(d, tmp_path, edit):
    import shutil
    e = tmp_path / "e"
    shutil.copytree(d, e)
    doc = json.loads((e / GRAPH_FILE).read_text())
    edit(doc)
    (e / GRAPH_FILE).write_text(json.dumps(doc))
    meta = json.loads((e / "qdsl_artifact.json").read_text())
    meta["files"][GRAPH_FILE] = {"sha256": sha256_file(e / GRAPH_FILE),
                                 "size": (e / GRAPH_FILE).stat().st_size}
    (e / "qdsl_artifact.json").write_text(json.dumps(meta))
    return e


def _node(doc, op):
    return next(n for n in doc["nodes"] if n["op"] == op)


@pytest.mark.parametrize("edit, match", [
    (lambda doc: _node(doc, "call_function").update(target="builtins.eval"),
     r"calls 'builtins.eval', not an operator qdsl stores"),
    (lambda doc: _node(doc, "call_function").update(target="aten.no_such_op.default"),
     r"calls aten.no_such_op.default, which this torch \(.*\) does not have"),
    (lambda doc: next(iter(doc["modules"].values())).update(type="os.system"),
     r"has type 'os.system', not one of qdsl's runtime modules"),
    (lambda doc: _node(doc, "call_function").update(args=[{"pickle": "x"}]),
     r"argument \{'pickle': 'x'\} is not a value qdsl stores"),
    (lambda doc: _node(doc, "call_function").update(args=[{"node": "later"}]),
     r"reads 'later' before it is defined"),
    (lambda doc: doc.update(version=99), r"not a qdsl-graph file of version 1"),
    (lambda doc: doc["tensors"].update({"extra.t": [[4], "complex64", "buffer"]}),
     r"cannot rebuild the graph: KeyError"),
])
def test_a_damaged_graph_is_a_one_line_error(saved, tmp_path, edit, match):
    _, _, _, d = saved
    with pytest.raises(ArtifactError, match="graph.json: ((node|module) \\S+ )?" + match):
        load_artifact_lm(_edited(d, tmp_path, edit))


def test_a_tensor_the_graph_does_not_read_is_refused(saved, tmp_path):
    _, _, _, d = saved

    def rename(doc):   # a get_attr renamed: the stored tensor is no longer one it reads
        node = _node(doc, "get_attr")
        doc["tensors"]["renamed"] = doc["tensors"].pop(node["target"])
        node["target"] = "renamed"
    with pytest.raises(ArtifactError, match=r"model.safetensors: tensor \S+ is not one "
                                            r"graph.json reads"):
        load_artifact_lm(_edited(d, tmp_path, rename))


def test_a_graph_it_cannot_store_is_not_stored_and_loads_by_capture(tmp_path, monkeypatch):
    model, q = _compile("w8a8_dynamic", "gpt2")
    monkeypatch.setattr(graphfile, "OP_NAMESPACES", ("qdsl",))   # aten ops: not storable
    d = q.save(tmp_path / "a")
    assert not (d / GRAPH_FILE).exists()
    ids = tiny_ids(model, 1, 8)
    assert torch.equal(load_artifact_lm(d).logits(ids), q(ids))


def test_structural_modules_round_trip_through_json():
    for m in (FusedAttention(0.125, gqa=True), OnlineHadamard(12), InputScale(torch.rand(6))):
        back = module_from_json(m.to_json())
        assert type(back) is type(m) and back.to_json() == m.to_json()
    assert module_from_json(InputScale(torch.rand(6)).to_json()).inv_scale.is_meta


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.text(max_size=5)
    | st.floats(allow_nan=False) | st.sampled_from([float("inf"), float("-inf")])
    | st.sampled_from(list(graphfile.DTYPES.values()))
    | st.sampled_from([torch.device("cpu"), torch.strided, torch.contiguous_format])
    | st.builds(slice, st.none() | st.integers(), st.none() | st.integers()),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_argument_values_round_trip(v):
    doc = json.loads(json.dumps(graphfile._value(v, "n")))
    back = graphfile._decode(doc, {}, "n", ArtifactError)
    assert back == v and type(back) is type(v)
