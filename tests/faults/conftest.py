"""The fault tests run many tiny trainings: one torch thread each (on a busy machine, more threads
only contend; 1 thread is several times faster for a 32-wide model)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
