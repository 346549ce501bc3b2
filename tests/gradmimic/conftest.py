import pytest
import torch


@pytest.fixture
def float64():
    """Exact comparisons with brute force run in double precision."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
