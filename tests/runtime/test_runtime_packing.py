import torch
from hypothesis import given

from qdsl.runtime.packing import pack_int, packed_len, unpack_int, unpack_signed
from strategies import packed_codes


@given(packed_codes())
def test_round_trip(case):
    codes, bits = case
    q = torch.tensor(codes, dtype=torch.int32)
    packed = pack_int(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (q.shape[0], packed_len(q.shape[1], bits))
    assert torch.equal(unpack_int(packed, bits, q.shape[1]).int(), q)


@given(packed_codes())
def test_unpack_signed_is_the_shift_and_mask_unpacking(case):
    """The one-lookup-per-byte unpacking gives the signed codes the runtime dequantizes:
    1 bit -> -1 / +1, else u - 2^(bits-1), exactly as unpacking with shifts and masks."""
    codes, bits = case
    if bits == 8:
        return  # the packed modules run 1 / 2 / 4 bits
    q = torch.tensor(codes, dtype=torch.int32)
    u = unpack_int(pack_int(q, bits), bits, q.shape[1]).int()
    want = (u * 2 - 1) if bits == 1 else u - 2 ** (bits - 1)
    got = unpack_signed(pack_int(q, bits), bits, q.shape[1])
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_layout_little_end_first():
    # values 1, 2, 15 at 4 bits -> bytes 0x21, 0x0F
    assert pack_int(torch.tensor([[1, 2, 15]]), 4).tolist() == [[0x21, 0x0F]]
    # eight 1-bit values, first value is the lowest bit
    assert pack_int(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]]), 1).tolist() == [[0x81]]
