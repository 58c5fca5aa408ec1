import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; the variable must be set before
    # any module that defines a @triton.jit kernel is imported, whichever test imports it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(os.environ.get("LOWBIT_FIXTURES", Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures")).resolve()


def fixture_dir(name: str) -> Path:
    """Path of a ../shared/fixtures folder; skips the test with a clear reason when it is absent."""
    p = FIXTURES / name
    if not p.is_dir():
        pytest.skip(f"fixture {name!r} not found under {FIXTURES} (set LOWBIT_FIXTURES to ../shared/fixtures)")
    return p


def all_fixture_names() -> list[str]:
    if not FIXTURES.is_dir():
        return []
    return sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
