"""Format-2 artifacts (tests/data/artifact_v2: written by main's code before format 3,
``qdsl.compile(...).save`` on tiny("gpt2"), with the logits they computed) still load, through qdsl.artifact.migrate, and compute exactly what they computed; a
loaded one saves as format 3. The fake-quant one holds static (per tensor, a4, PEG)
FakeQuants, DynamicFakeQuants and an fp16 FloatCast; the int8 one is self-contained."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny

import qdsl
from qdsl.artifact.migrate import migrate
from qdsl.artifact.store import FORMAT_VERSION, read_artifact
from qdsl.config.spec import TensorSpec
from qdsl.errors import ArtifactError

V2 = Path(__file__).parent / "data" / "artifact_v2"
EXPECTED = load_file(str(V2 / "expected.safetensors"))   # ids and logits at save time


@pytest.fixture(scope="module")
def model():
    return tiny("gpt2")


def _load(kind, model, d=None):
    return qdsl.load(d or V2 / kind, model if kind == "fake" else None)


@pytest.mark.parametrize("kind", ["int8", "fake"])
def test_v2_artifact_loads_and_computes_what_it_did(kind, model, tmp_path):
    assert json.loads((V2 / kind / "qdsl_artifact.json").read_text())["format_version"] == 2
    q = _load(kind, model)
    with torch.no_grad():
        y = q(EXPECTED["ids"])
    # the float GEMMs' summation order follows torch's thread count (another test may
    # have set 1): 6e-8 apart at most here, where one a8 / w8 step is ~1e-2
    torch.testing.assert_close(y, EXPECTED[kind], rtol=0, atol=1e-6)
    out = q.save(tmp_path / kind)                            # saved again: format 3
    meta = json.loads((out / "qdsl_artifact.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert all(set(c) == {"type", "spec"} for c in meta["quantizers"]["activations"].values())
    with torch.no_grad():
        assert torch.equal(_load(kind, model, out)(EXPECTED["ids"]), y)   # same process
    for f in ("quant_params.safetensors", "plan.json") + (("model.safetensors",)
                                                           if kind == "int8" else ()):
        assert (out / f).read_bytes() == (V2 / kind / f).read_bytes(), f


def test_migrated_quantizers_are_the_planned_specs():
    meta, plan, _ = read_artifact(V2 / "fake")
    planned = {e["name"]: e["activation"] for e in plan["entries"]}
    acts = meta["quantizers"]["activations"]
    assert {c["type"] for c in acts.values()} == {"FakeQuant", "DynamicFakeQuant", "FloatCast"}
    for name, c in acts.items():
        assert c["spec"] == planned[name]
        TensorSpec.from_json(c["spec"])                      # a valid spec
    assert acts["block.1.mlp.c_fc"]["spec"]["granularity"] == {"name": "per_group", "k": 2,
                                                                "permute": True}
    assert acts["block.0.mlp.c_fc"] == {"type": "FloatCast", "spec": planned["block.0.mlp.c_fc"]}
    assert migrate(meta | {"format_version": 3}, plan)["quantizers"] is meta["quantizers"]


@pytest.mark.parametrize("edit, match", [
    (lambda a: a["block.1.attn.out"].update(bits=8), "activation quantizer"),
    (lambda a: a["block.0.mlp.c_fc"].update(float_dtype="bf16"), "activation quantizer"),
    (lambda a: a.update({"nowhere": {"type": "FakeQuant", "bits": 8, "symmetric": True}}),
     "quantizers for nodes the plan does not have"),
    (lambda a: a["block.0.ln_2"].update(spec={}), 'has an unknown key "spec"'),
])
def test_v2_entry_that_disagrees_with_its_plan_is_refused(model, tmp_path, edit, match):
    d = tmp_path / "fake"
    shutil.copytree(V2 / "fake", d)
    meta = json.loads((d / "qdsl_artifact.json").read_text())
    edit(meta["quantizers"]["activations"])
    (d / "qdsl_artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match):
        qdsl.load(d, model, verify=False)
