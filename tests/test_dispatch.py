"""fastrank.dispatch: the FASTRANK_BACKEND override against ops that lack the forced backend."""
import warnings

import pytest
import torch

from fastrank import BackendUnavailableError, LiteScorer, dispatch, lite_score, maxsim, maxsim_ref
from fastrank.cpu_isa import selected as selected_isa


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The once-per-op warning is process state: each test starts as a fresh process would."""
    monkeypatch.setattr(dispatch, "_ENV_IGNORED_WARNED", set(), raising=False)


def _lite_inputs():
    g = torch.Generator().manual_seed(0)
    scorer = LiteScorer(lq=6, ld=9, row_hidden=8, col_hidden=5)
    q, d = torch.randn(5, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    return scorer, q, d


def test_env_backend_is_ignored_with_a_warning_where_the_op_lacks_it(monkeypatch, fresh_warnings):
    scorer, q, d = _lite_inputs()
    expected = lite_score(q, d, scorer=scorer)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    with pytest.warns(RuntimeWarning, match=r"FASTRANK_BACKEND=cpp ignored: 'lite' has no cpp implementation"):
        out = lite_score(q, d, scorer=scorer)
    torch.testing.assert_close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op, not once per call
        lite_score(q, d, scorer=scorer)
    ex = dispatch.explain("lite", (q, d), dtype=q.dtype, weight_dtype=torch.float32, lq=6, ld=9)
    assert "ignored" in ex.override and "ignored" in str(ex)
    assert ex.chosen is not None and ex.chosen != "cpp"


def test_explicit_backend_still_raises_where_the_op_lacks_it(monkeypatch, fresh_warnings):
    scorer, q, d = _lite_inputs()
    with pytest.raises(BackendUnavailableError, match="'lite' has no cpp implementation"):
        lite_score(q, d, scorer=scorer, backend="cpp")
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    with pytest.raises(BackendUnavailableError, match="'lite' has no cpp implementation"):
        lite_score(q, d, scorer=scorer, backend="cpp")


def test_env_backend_still_forces_ops_that_have_it(monkeypatch, fresh_warnings):
    q, d = torch.randn(70, 8), torch.randn(3, 5, 8)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(maxsim(q, d), maxsim_ref(q, d), rtol=1e-5, atol=1e-5)
    ex = dispatch.explain("maxsim", (q, d))
    assert "forces the cpp backend" in ex.override
    # forced, cpp runs even where automatic dispatch would call it slower (one pair, a scalar path)
    assert ex.chosen == "cpp" or selected_isa() == "scalar"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # the op has it, this call cannot: still an error
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        maxsim(q, d)
    assert dispatch.explain("maxsim", (q, d)).chosen is None

