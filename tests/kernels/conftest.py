"""Kernel tests run on CUDA when there is a GPU, else on CPU through Triton's interpreter.

Each ``@triton.jit`` picks interpreted or compiled when it is decorated, so ``TRITON_INTERPRET=1`` is set while
``gatekv.kernels.triton_kernels`` is imported here, at collection time. It is then restored, and set again only
around the tests of this directory (autouse fixture): with it set, the ``auto`` dispatch sends CPU tensors to
the interpreter, which would make every other test in the same pytest process several times slower (the
end-to-end suite went from 3.4 to over 15 minutes). Export ``TRITON_INTERPRET=1`` to run everything through it.
"""

import os

import pytest
import torch

INTERPRET = not torch.cuda.is_available()

if INTERPRET:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import gatekv.kernels.triton_kernels  # noqa: F401  (decorated for the interpreter, once per process)
    except ImportError:  # no triton: the Triton tests skip themselves
        pass
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """The interpreter's launches need the variable set; so does the ``auto`` dispatch for CPU tensors."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
