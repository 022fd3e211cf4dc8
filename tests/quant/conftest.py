import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The quantizer tests run thousands of ops on tiny tensors: thread hand-off costs
    more than the work (about 4x on a busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
