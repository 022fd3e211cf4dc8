import torch
from hypothesis import given

from qdsl.runtime.packing import pack_int, packed_len, unpack_int
from strategies import packed_codes


@given(packed_codes())
def test_round_trip(case):
    codes, bits = case
    q = torch.tensor(codes, dtype=torch.int32)
    packed = pack_int(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (q.shape[0], packed_len(q.shape[1], bits))
    assert torch.equal(unpack_int(packed, bits, q.shape[1]).int(), q)


def test_layout_little_end_first():
    # values 1, 2, 15 at 4 bits -> bytes 0x21, 0x0F
    assert pack_int(torch.tensor([[1, 2, 15]]), 4).tolist() == [[0x21, 0x0F]]
    # eight 1-bit values, first value is the lowest bit
    assert pack_int(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]]), 1).tolist() == [[0x81]]
