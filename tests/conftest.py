import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a thread pool only adds contention on a shared 2-core machine, so the modules
    that ask for it (``pytestmark = pytest.mark.usefixtures("one_thread")``) run on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_brackets():
    """Every test searches its brackets afresh: the engine remembers recent weights
    (``sepconv.spectral.bracketing.RECENT``), which would let a test that patches a route reuse
    another test's result instead of taking the route."""
    from sepconv.spectral.bracketing import RECENT

    RECENT.clear()
    yield
    RECENT.clear()
