import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The spectral tests run thousands of tiny linear-algebra calls: with a shared, loaded
    machine a thread pool only adds synchronisation cost (x10-20 measured), so use one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
