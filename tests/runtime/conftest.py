import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """These tests run many tiny models: with two intra-op threads on a busy 2-core machine
    every op waits on a thread barrier, which made them ~8x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
