"""Damaged, edited and hostile artifacts: every one is refused with a one-line
ArtifactError naming the file (never a traceback, never a huge allocation, never a
download); --no-verify loads a byte-flipped one. Two small artifacts (a fake-quant
one with a PEG activation and a self-contained int8 one) are built once per module
and copied per case."""

import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny, tiny_ids

import qdsl
from qdsl.cli import main
from qdsl.errors import ArtifactError

W8A8 = """
*                    -> w8 sym per_channel
block.*.ln_1         -> a8 asym per_tensor dynamic
block.*.attn.context -> a8 sym per_token dynamic
block.*.ln_2         -> a8 per_tensor static
"""
FAKE = W8A8 + "block.0.mlp.c_fc -> a8 per_group(K=2, permute)\n"
CACHE = 16
V2 = Path(__file__).parent / "data" / "artifact_v2"   # written by main's code (format 2)


@pytest.fixture(scope="module")
def model():
    return tiny("gpt2")


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts")
    calib = tiny_ids(model, 2, 8)
    int8 = qdsl.compile(model, W8A8, calib=calib, lower="int8", max_cache_len=CACHE,
                        progress=False).save(d / "int8")
    fake = qdsl.compile(model, FAKE, calib=calib, max_cache_len=CACHE,
                        progress=False).save(d / "fake")
    return {"int8": int8, "fake": fake}


def copy(built, kind, tmp_path) -> Path:
    out = tmp_path / kind
    shutil.copytree(built[kind], out)
    return out


def load(path, model, **kw):
    """qdsl.load: the fake-quant artifact against its model, the int8 one alone."""
    return qdsl.load(path, model if path.name.startswith("fake") else None, **kw)


def edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)                       # edits in place
    path.write_text(json.dumps(obj))


def tensor_span(path: Path, name_part: str, dtype: str = "F32") -> tuple[int, int]:
    """Byte range in the file of the first tensor whose name contains ``name_part``."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    for k, e in header.items():
        if k != "__metadata__" and name_part in k and e["dtype"] == dtype:
            lo, hi = e["data_offsets"]
            return 8 + n + lo, 8 + n + hi
    raise AssertionError(f"no {dtype} tensor like {name_part} in {path}")


def patch(path: Path, at: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


def refused(path, model, match, **kw):
    with pytest.raises(ArtifactError, match=match) as e:
        load(path, model, **kw)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    return str(e.value)


# --------------------------------------------------------------------------- hashes


def test_marker_records_every_file(built, model):
    for kind, d in built.items():
        meta = json.loads((d / "qdsl_artifact.json").read_text())
        files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
        assert set(meta["files"]) == files - {"qdsl_artifact.json"}
        assert meta["format_version"] == 3
        umask = os.umask(0)
        os.umask(umask)
        modes = {p.relative_to(d).as_posix(): p.stat().st_mode & 0o777
                 for p in d.rglob("*") if p.is_file()}
        assert modes == {f: 0o666 & ~umask for f in files | {"qdsl_artifact.json"}}
        load(d, model)


@pytest.mark.parametrize("kind, rel", [
    ("int8", "model.safetensors"), ("int8", "quant_params.safetensors"),
    ("int8", "model/config.json"), ("fake", "quant_params.safetensors"),
    ("fake", "plan.json"), ("fake", "recipe.qrec")])
def test_flipped_byte_refused_by_hash(built, model, tmp_path, kind, rel):
    d = copy(built, kind, tmp_path)
    raw = bytearray((d / rel).read_bytes())
    raw[len(raw) - 3] ^= 0x01      # the last bytes: tensor data or JSON / recipe text
    (d / rel).write_bytes(bytes(raw))
    msg = refused(d, model, f"{rel} does not match its recorded hash")
    assert "--no-verify" in msg


def test_no_verify_loads_a_flipped_weight(built, model, tmp_path):
    d = copy(built, "int8", tmp_path)
    lo, _ = tensor_span(d / "model.safetensors", "c_fc.weight", "I8")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[lo] ^= 0x40
    (d / "model.safetensors").write_bytes(bytes(raw))
    refused(d, model, "model.safetensors does not match")
    q = load(d, model, verify=False)
    assert torch.isfinite(q(tiny_ids(model, 1, 6))).all()


def test_ff_bytes_in_a_float_tensor_are_refused(built, model, tmp_path):
    for kind, rel, name in (("int8", "model.safetensors", "scale"),
                            ("fake", "quant_params.safetensors", "act.block.0.ln_2.scale")):
        d = copy(built, kind, tmp_path / kind)
        lo, hi = tensor_span(d / rel, name)
        patch(d / rel, lo, b"\xff" * (hi - lo))
        refused(d, model, f"{rel}: tensor .* NaN or infinite", verify=False)


def test_format_1_artifact_loads_with_a_warning(model, tmp_path):
    d = tmp_path / "int8"
    shutil.copytree(V2 / "int8", d)       # format 2 as main wrote it; 1 has no hashes
    edit_json(d / "qdsl_artifact.json", lambda m: (m.pop("files"), m.update(format_version=1)))
    with pytest.warns(UserWarning, match="cannot be verified"):
        load(d, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(d, model, verify=False)    # asked not to verify: no warning


def test_format_2_without_hashes_is_refused(built, model, tmp_path):
    d = copy(built, "fake", tmp_path)
    edit_json(d / "qdsl_artifact.json", lambda m: m.pop("files"))
    refused(d, model, 'qdsl_artifact.json: missing key "files"')


def test_file_added_to_model_dir_is_refused(built, model, tmp_path):
    d = copy(built, "int8", tmp_path)
    (d / "model" / "tokenizer_config.json").write_text("{}")
    refused(d, model, "model/tokenizer_config.json is not recorded")


# --------------------------------------------------------------------------- recipe


def test_garbage_recipe_refused(built, model, tmp_path):
    d = copy(built, "fake", tmp_path)
    (d / "recipe.qrec").write_bytes(b"\x00\xffgarbage -> ->\n")
    refused(d, model, "recipe.qrec does not match its recorded hash")
    refused(d, model, "recipe.qrec does not parse", verify=False)


def test_other_recipe_refused(built, model, tmp_path):
    d = copy(built, "fake", tmp_path)
    (d / "recipe.qrec").write_text("* -> w4\n")
    refused(d, model, "recipe.qrec does not agree with the recipe recorded", verify=False)


def test_recorded_rules_must_have_the_recorded_hash(built, model, tmp_path):
    d = copy(built, "fake", tmp_path)
    edit_json(d / "qdsl_artifact.json",
              lambda m: m["recipe"]["rules"]["rules"][0]["weight"].update(bits=4))
    refused(d, model, "recorded recipe rules do not have the recorded recipe hash")


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.update(lower="int4"),
     'qdsl_artifact.json: lower must be one of fake, int8; got "int4"'),
    (lambda m: m.pop("mode"), 'qdsl_artifact.json: missing key "mode"'),
    (lambda m: m.update(max_cache_len="16"), "max_cache_len must be an integer"),
    (lambda m: m.update(max_cache_len=10 ** 12), r"max_cache_len must be 1\.\.1048576"),
    (lambda m: m["quantizers"]["activations"]["block.0.ln_2"]["spec"].update(bits=99),
     r'quantizers.activations\["block.0.ln_2"\].spec.bits must be 1\.\.16, got 99'),
    (lambda m: m["quantizers"]["activations"]["block.0.ln_2"].update(bits=8),
     r'quantizers.activations\["block.0.ln_2"\] has an unknown key "bits"'),
    (lambda m: m.update(format_version=4), "format 4; it reads 1, 2, 3"),
    (lambda m: m["int8"].update(fallback=None), "int8.fallback must be a string"),
    (lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}}), "malformed"),
    (lambda m: m.update(extra=1), 'unknown key "extra"'),
])
def test_marker_schema(built, model, tmp_path, mutate, match):
    d = copy(built, "int8", tmp_path)
    edit_json(d / "qdsl_artifact.json", mutate)
    refused(d, model, match)


@pytest.mark.parametrize("text", ["[]", "null", "{", "", '{"format": "qdsl-artifact"}',
                                  '{"a": NaN}', "[" * 100000])
def test_marker_not_an_object(built, model, tmp_path, text):
    d = copy(built, "int8", tmp_path)
    (d / "qdsl_artifact.json").write_text(text)
    refused(d, model, "qdsl_artifact.json")


def _entry(plan, quantized_weight=True):
    return next(i for i, e in enumerate(plan["entries"])
                if e["weight"] and (e["weight"]["bits"] is not None) == quantized_weight)


def test_plan_bits_99(built, model, tmp_path):
    d = copy(built, "int8", tmp_path)
    plan = json.loads((d / "plan.json").read_text())
    i = _entry(plan)
    plan["entries"][i]["weight"]["bits"] = 99
    (d / "plan.json").write_text(json.dumps(plan))
    refused(d, model, "plan.json does not match its recorded hash")
    refused(d, model, rf"plan.json: entries\[{i}\].weight.bits must be 1\.\.16, got 99",
            verify=False)


@pytest.mark.parametrize("mutate, match", [
    (lambda p, i: p["entries"][i]["weight"].update(symmetric=False), "does not agree"),
    (lambda p, i: p["entries"][i]["weight"].update(bits=4), "does not agree"),
    (lambda p, i: p.update(recipe_hash="0" * 16), "recipe hash"),
    (lambda p, i: p["entries"].pop(i), "does not agree"),
    (lambda p, i: p["entries"][i].pop("activation"), 'has no key "activation"'),
    (lambda p, i: p["entries"][i]["activation"]["granularity"].update(name="per_row"),
     "granularity.name must be one of"),
])
def test_plan_edits_refused(built, model, tmp_path, mutate, match):
    d = copy(built, "fake", tmp_path)
    edit_json(d / "plan.json", lambda p: mutate(p, _entry(p)))
    refused(d, model, match, verify=False)


# --------------------------------------------------------------------------- tensor files


def test_truncated_and_damaged_safetensors(built, model, tmp_path):
    for i, damage in enumerate((lambda b: b[:len(b) // 2], lambda b: b[:5],
                                lambda b: b[:8] + b"{\x00garbage" + b[18:],
                                lambda b: b[:8] + b[8:].replace(b'"shape":[', b'"shape":[9999,', 1),
                                lambda b: struct.pack("<Q", 1 << 62) + b[8:])):
        d = copy(built, "int8", tmp_path / str(i))
        f = d / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        refused(d, model, "model.safetensors", verify=False)


def test_pickle_in_place_of_safetensors(built, model, tmp_path):
    d = copy(built, "int8", tmp_path)
    torch.save({"x": torch.zeros(3)}, d / "model.safetensors")
    refused(d, model, "model.safetensors is not a safetensors file", verify=False)


def test_not_regular_files_refused_before_opening(built, model, tmp_path):
    d = copy(built, "int8", tmp_path / "a")
    os.remove(d / "model.safetensors")
    os.symlink("/dev/zero", d / "model.safetensors")
    refused(d, model, "model.safetensors is a symbolic link")
    refused(d, model, "model.safetensors is a symbolic link", verify=False)
    d = copy(built, "fake", tmp_path / "b")
    os.remove(d / "plan.json")
    os.mkfifo(d / "plan.json")                 # opening it would block forever
    refused(d, model, "plan.json is not a regular file", verify=False)
    d = copy(built, "int8", tmp_path / "c")
    shutil.rmtree(d / "model")
    os.symlink(built["int8"] / "model", d / "model")
    refused(d, model, "model is not a directory", verify=False)


@pytest.mark.parametrize("kind, rel", [
    ("int8", "plan.json"), ("int8", "recipe.qrec"), ("int8", "quant_params.safetensors"),
    ("int8", "model.safetensors"), ("int8", "model/config.json"), ("int8", "model"),
    ("fake", "quant_params.safetensors")])
def test_missing_files(built, model, tmp_path, kind, rel):
    d = copy(built, kind, tmp_path)
    shutil.rmtree(d / rel) if (d / rel).is_dir() else os.remove(d / rel)
    refused(d, model, "is missing", verify=False)


def test_missing_quant_tensor(built, model, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy(built, "fake", tmp_path)
    t = load_file(str(d / "quant_params.safetensors"))
    del t["act.block.0.mlp.c_fc.perm"]
    t["act.block.0.ln_2.scale"] = -t["act.block.0.ln_2.scale"]
    save_file(t, str(d / "quant_params.safetensors"))
    refused(d, model, "act.block.0.ln_2.scale must hold positive scales", verify=False)


def test_stored_tensor_of_another_shape(built, model, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy(built, "int8", tmp_path)
    t = load_file(str(d / "model.safetensors"))
    name = next(k for k in t if k.endswith("bias"))
    t[name] = torch.zeros(t[name].numel() + 1)
    save_file(t, str(d / "model.safetensors"))
    refused(d, model, rf"model.safetensors: tensor {name} is \[\d+\] torch.float32; the model "
                      r"in model/config.json needs", verify=False)


def test_stored_tensor_under_an_unknown_name(built, model, tmp_path):
    """A renamed key (one flipped byte in the header, found by the fuzz test) was an
    AttributeError from assigning it to a module that does not exist."""
    from safetensors.torch import load_file, save_file
    d = copy(built, "int8", tmp_path)
    t = load_file(str(d / "model.safetensors"))
    name = next(k for k in t if "." not in k) if any("." not in k for k in t) else next(iter(t))
    t["qdsl_int8__no_such_module." + name] = t.pop(name)
    save_file(t, str(d / "model.safetensors"))
    refused(d, model, r"model.safetensors: tensor qdsl_int8__no_such_module\.\S+ is not one the "
                      r"model in model/config.json reads", verify=False)


# --------------------------------------------------------------------------- model/config.json


@pytest.mark.parametrize("change, match", [
    ({"vocab_size": 1e9}, "vocab_size must be an integer"),
    ({"vocab_size": 10 ** 12}, "vocab_size must be an integer"),
    ({"vocab_size": 1 << 24}, "describes a model of"),          # 2 GB float: not allocated
    ({"n_layer": 1000}, r"describes \d+ module\(s\) the plan does not have"),  # not captured
    ({"vocab_size": 129}, "do not fit the model of model/config.json"),
    ({"n_positions": 8}, "max_cache_len 16 exceeds the model's 8 positions"),
    ({"model_type": "no-such-model"}, "cannot rebuild the model from model/config.json"),
])
def test_config_checked_against_stored_tensors(built, model, tmp_path, change, match):
    d = copy(built, "int8", tmp_path)
    edit_json(d / "model" / "config.json", lambda c: c.update(change))
    refused(d, model, match, verify=False)


def test_config_not_an_object(built, model, tmp_path):
    d = copy(built, "int8", tmp_path)
    (d / "model" / "config.json").write_text("[]")
    refused(d, model, "model/config.json must be an object", verify=False)


# --------------------------------------------------------------------------- no downloads


def test_never_contacts_a_hub(built, model, tmp_path, monkeypatch):
    import huggingface_hub

    import qdsl.models.zoo

    calls = []

    def no_network(*a, **kw):
        calls.append(kw)
        if not kw.get("local_files_only"):
            raise AssertionError("tried to download")
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(qdsl.models.zoo, "_resolve_hub", lambda *a: pytest.fail("hub"))
    d = copy(built, "fake", tmp_path / "a")
    edit_json(d / "qdsl_artifact.json", lambda m: m["model"].update(id="someorg/somemodel"))
    msg = refused(d, None, "'someorg/somemodel', which is not a short name or a model "
                           "directory on this machine")
    assert "--baseline" in msg
    refused(d, None, "never downloads")                      # the default: no model given
    assert qdsl.load(d, model)                               # the model given: fine
    d = copy(built, "int8", tmp_path / "b")
    shutil.rmtree(d / "model")
    refused(d, model, "model/config.json is missing", verify=False)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("cmd", [["eval", "--n", "1"], ["bench", "--rounds", "1"]])
@pytest.mark.parametrize("damage", ["flip", "garbage-recipe"])
def test_cli_one_line_exit_2(built, tmp_path, capsys, cmd, damage):
    d = copy(built, "int8", tmp_path)
    if damage == "flip":
        patch(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 1, b"\x07")
        args, match = [], "model.safetensors does not match its recorded hash"
    else:
        (d / "recipe.qrec").write_text("*** not a recipe")
        args, match = ["--no-verify"], "recipe.qrec does not parse"
    rc = main([cmd[0], str(d), *cmd[1:], *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and match in err


# --------------------------------------------------------------------------- fuzz

FILES = {"int8": ["qdsl_artifact.json", "plan.json", "recipe.qrec", "quant_params.safetensors",
                  "model.safetensors", "model/config.json"],
         "fake": ["qdsl_artifact.json", "plan.json", "recipe.qrec", "quant_params.safetensors"]}


def _mutate_bytes(raw: bytes, op: str, at: float, data: bytes) -> bytes:
    i = int(at * len(raw))
    if op == "flip":
        return raw[:i] + bytes([raw[i] ^ (data[0] or 1)]) + raw[i + 1:] if raw else data
    if op == "truncate":
        return raw[:i]
    if op == "extend":
        return raw + data
    if op == "splice":
        return raw[:i] + data + raw[i + len(data):]
    return data  # replace the whole file


def _loads_or_refuses(d: Path, model, verify: bool) -> bool:
    """qdsl.load either raises ArtifactError or gives a model that runs; True if it loaded."""
    try:
        q = load(d, model, verify=verify)
    except ArtifactError as e:
        assert "\n" not in str(e), str(e)
        return False
    q(tiny_ids(model, 1, 4))
    return True


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["int8", "fake"]), which=st.integers(0, 5),
       op=st.sampled_from(["flip", "truncate", "extend", "splice", "replace"]),
       at=st.floats(0, 0.999), data=st.binary(min_size=1, max_size=64))
def test_fuzz_bytes(built, model, kind, which, op, at, data):
    rel = FILES[kind][which % len(FILES[kind])]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / kind
        shutil.copytree(built[kind], d)
        raw = (d / rel).read_bytes()
        new = _mutate_bytes(raw, op, at, data)
        (d / rel).write_bytes(new)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # a marker mutated into format 1 warns
            if new != raw and rel != "qdsl_artifact.json":
                with pytest.raises(ArtifactError, match=rel.replace(".", r"\.")):
                    load(d, model)                # the hash catches every changed byte
            _loads_or_refuses(d, model, verify=rel == "qdsl_artifact.json")


JUNK = st.sampled_from([None, [], {}, "", "x", 0, -1, 1.5, 10 ** 30, 1e300, True,
                        "a" * 5000, [[[[]]]], {"name": "x"}])


def _paths(obj, path=()):
    """Every (path to a value) in a JSON tree, the root excluded."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield (*path, k)
        yield from _paths(v, (*path, k))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["int8", "fake"]), rel=st.sampled_from(["qdsl_artifact.json",
                                                                   "plan.json"]),
       pick=st.floats(0, 0.999), op=st.sampled_from(["delete", "replace"]), junk=JUNK)
def test_fuzz_json(built, model, kind, rel, pick, op, junk):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / kind
        shutil.copytree(built[kind], d)
        obj = json.loads((d / rel).read_text())
        paths = list(_paths(obj))
        path = paths[int(pick * len(paths))]
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = junk
        (d / rel).write_text(json.dumps(obj))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _loads_or_refuses(d, model, verify=rel == "qdsl_artifact.json")
