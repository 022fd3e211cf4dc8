"""qdsl.runtime.hugepages: a module's tensors moved into one huge-page buffer keep their
values, shapes, strides, dtypes and sharing, never alias each other otherwise, and a
compiled decode step over moved tensors gives the eager graph's logits."""

import pytest
import torch
from tiny import tiny, tiny_ids

from qdsl.graph.capture import capture
from qdsl.passes.fuse_attention import fuse_attention
from qdsl.runtime import compiled, hugepages
from qdsl.runtime.graphlm import GraphLM


def _needs_huge_pages():
    if hugepages.huge_buffer(hugepages.HUGE) is None:
        pytest.skip("this kernel refuses MADV_HUGEPAGE (not Linux, or transparent huge "
                    "pages set to never): rehome leaves tensors where they are")


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight                     # tied
        self.q = torch.nn.Linear(8, 8)
        self.register_buffer("cache", torch.randn(2, 4, 8))
        self.register_buffer("codes", torch.randint(-127, 128, (16, 8), dtype=torch.int8))
        self.register_buffer("slot", self.cache[1])            # a view of another buffer
        self.scale = torch.rand(8)                             # a plain tensor attribute

    def forward(self, ids):
        x = self.q(self.emb(ids)) * self.scale + self.slot[0]
        return self.head(x) + self.codes.float().sum()


def test_rehome_keeps_values_and_sharing_and_moves_onto_one_buffer():
    _needs_huge_pages()
    m = Toy()
    ids = torch.tensor([[1, 2, 3]])
    before = m(ids)
    shapes = {k: (v.shape, v.stride(), v.dtype) for k, v in m.state_dict().items()}
    moved = hugepages.rehome(m, min_bytes=0)
    assert moved.tensors == 8 and moved.storages == 6      # tied weight, view: shared
    assert torch.equal(m(ids), before)
    assert {k: (v.shape, v.stride(), v.dtype) for k, v in m.state_dict().items()} == shapes
    assert m.head.weight is m.emb.weight and isinstance(m.emb.weight, torch.nn.Parameter)
    assert m.slot.untyped_storage().data_ptr() == m.cache.untyped_storage().data_ptr()
    m.cache[1, 0, 0] = 42.0                                 # still a view: in place
    assert m.slot[0, 0] == 42.0
    ptrs = {t.untyped_storage().data_ptr() for t in
            (m.emb.weight, m.q.weight, m.q.bias, m.cache, m.codes, m.scale)}
    assert len(ptrs) == 6                                   # no two storages alias
    buf = m.__dict__[hugepages._HOLDER].buf
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    assert all(lo <= p < hi for p in ptrs) and lo % hugepages.HUGE == 0
    assert hugepages.rehome(m, min_bytes=0) == hugepages.Moved()   # once


def test_rehome_leaves_small_modules_and_the_switch_off(monkeypatch):
    m = Toy()
    ptr = m.q.weight.data_ptr()
    assert hugepages.rehome(m) == hugepages.Moved()        # far under 2 MiB
    assert m.q.weight.data_ptr() == ptr
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.wanted()
    monkeypatch.delenv(hugepages.ENV)
    assert hugepages.wanted()


def test_compiled_step_over_moved_tensors_matches_eager(tmp_path, monkeypatch):
    """The compiled step moves the graph's weights and caches before compiling (here
    forced for a tiny graph); its logits are the eager graph's, and the steps after the
    first still skip dynamo (the moved caches alias nothing)."""
    _needs_huge_pages()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(compiled.BACKEND_ENV, "aot_eager")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    m = tiny("llama")
    gm = capture(m, mode="generate", max_cache_len=32).gm
    fuse_attention(gm)
    ids = tiny_ids(m, 1, 16)
    ref = GraphLM(gm, 32, compile_decode=False)
    want = [ref.prefill(ids[:, :5])] + [ref.decode(int(t)) for t in ids[0, 5:11]]
    lm = GraphLM(gm, 32, compile_decode=True)
    got = [lm.prefill(ids[:, :5])] + [lm.decode(int(t)) for t in ids[0, 5:11]]
    assert lm.step.moved.nbytes > 0 and lm.step.direct
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)
