"""Test set-up: one thread per process (2-core machines thrash otherwise), CPU DeepSpeed."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """A ZeRO-3 engine built inside the test process replaces ``torch.nn.functional.linear``
    with DeepSpeed's ``zero3_linear_wrap`` (memory_efficient_linear) and never puts it back; a
    training process builds one engine, a test session many. Restore it after each test so no
    test sees another's patch."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear
