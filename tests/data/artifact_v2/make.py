"""How tests/data/artifact_v2 was made: with main's code at 5b9c4de (artifact format 2),
    PYTHONPATH=<main checkout> python tests/data/artifact_v2/make.py tests/data/artifact_v2
Two tiny artifacts of tests/tiny.py's gpt2 (int8 self-contained; fake-quant with static,
PEG, a4, dynamic and fp16 quantizers) and the logits each computed when loaded
(expected.safetensors). tests/test_artifact_migrate.py loads them with today's code."""
import shutil, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
from safetensors.torch import save_file
from tiny import tiny, tiny_ids
import qdsl

W8A8 = """
*                    -> w8 sym per_channel
block.*.ln_1         -> a8 asym per_tensor dynamic
block.*.attn.context -> a8 sym per_token dynamic
block.*.ln_2         -> a8 per_tensor static
block.0.mlp.c_fc     -> fp16
"""
FAKE = W8A8 + "block.1.mlp.c_fc -> a8 per_group(K=2, permute)\nblock.1.attn.out -> a4 asym per_tensor static\n"
out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
model = tiny("gpt2")
calib = tiny_ids(model, 2, 8)
ids = tiny_ids(model, 1, 6)
i8 = qdsl.compile(model, W8A8, calib=calib, lower="int8", max_cache_len=16, progress=False)
fk = qdsl.compile(model, FAKE, calib=calib, max_cache_len=16, progress=False)
i8.save(out / "int8"); fk.save(out / "fake")
with torch.no_grad():
    exp = {"ids": ids, "int8": qdsl.load(out / "int8")(ids), "fake": qdsl.load(out / "fake", model)(ids)}
save_file({k: v.contiguous() for k, v in exp.items()}, str(out / "expected.safetensors"))
print(qdsl.__file__)
