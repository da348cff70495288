"""Triton kernels run under the interpreter on CPU: the variable must be set before Triton kernels are
defined, that is before fastrank is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_report_header(config):
    import fastrank
    from fastrank import _ext

    ext = _ext.load()
    built = "not built" if ext is None else f"built (cuda={ext.has_cuda}, openmp={ext.has_openmp})"
    return [
        f"fastrank {fastrank.__version__}: extension {built}; torch {torch.__version__}; "
        f"cuda available: {torch.cuda.is_available()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    ]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a FASTRANK_BACKEND from the shell must not leak in."""
    monkeypatch.delenv("FASTRANK_BACKEND", raising=False)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any encoder or cross-encoder construction fails the test: the options were not checked first."""
    from fastrank import encoders

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(encoders.Encoder, "__init__", refuse)
    monkeypatch.setattr(encoders.CrossEncoder, "__init__", refuse)
