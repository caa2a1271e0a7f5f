"""Test set-up: one thread per process (2-core machines thrash otherwise), CPU DeepSpeed.

The suite is a CPU suite on every machine. On a machine with a GPU, `make test` exports
DS_ACCELERATOR=cuda (for `make demo`), and torch.cuda.is_available() is what dsft consults for
the process-group backend, the fused optimizers and the CUDA RNG state; an engine built in the
test process would then live on the GPU while the tests feed it CPU tensors, and a CPU-accelerator
run would pick NCCL. So the accelerator is forced to the CPU and CUDA is hidden before torch or
DeepSpeed is imported, here and in every run the tests launch (they inherit this environment).
GPU checks live in bench/ (gpu_smoke.py, gpu_methods_smoke.py).

Liger's Triton kernels (train.loss: liger) run under Triton's interpreter, which executes the same
kernel programs with NumPy on CPU tensors. Triton reads TRITON_INTERPRET when a kernel is
decorated, that is when liger_kernel is first imported, so it is set here, before any test module
imports anything.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TRITON_INTERPRET"] = "1"

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


@pytest.fixture
def own_data_cache(tmp_path, monkeypatch):
    """A tokenized-data cache of the test's own (dsft.data_cache), not ~/.cache/dsft/data: a
    test of the data path must build what it reads. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("own_data_cache")``."""
    monkeypatch.setenv("DSFT_DATA_CACHE", str(tmp_path / "data_cache"))
