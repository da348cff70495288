"""fastrank.encoders.CrossEncoder on a tiny randomly initialised BertForSequenceClassification: the scores are
the checkpoint's own logits on the tokenized pair, whatever the batching and the order, and bad input or a
checkpoint that is not a cross-encoder is a clear error."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fastrank.data import load_trec_dl  # noqa: E402
from fastrank.encoders import CrossEncoder  # noqa: E402
from tiny_bert import make_tiny_bert, make_tiny_cross_encoder  # noqa: E402

DL19 = Path(__file__).parent / "data" / "dl19-slice"
MAX_LENGTH = 64  # shorter than most slice passages: truncation is part of what is checked


@pytest.fixture(scope="module")
def dl19():
    return load_trec_dl(DL19)


def _texts(data):
    return list(data.queries.values()) + list(data.passages.values())


@pytest.fixture(scope="module")
def tiny_cross(tmp_path_factory, dl19):
    return make_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross"), _texts(dl19))


@pytest.fixture(scope="module")
def pairs(dl19):
    """Every (query, candidate) text pair of the slice, plus an empty query and a one-word passage."""
    qs, ps = [], []
    for qid, cands in dl19.candidates.items():
        for pid in cands:
            qs.append(dl19.queries[qid])
            ps.append(dl19.passages[pid])
    return qs + ["", "what"], ps + ["a passage for the empty query", "dog"]


def _reference(path, queries, passages, max_length=MAX_LENGTH):
    """One pair at a time, straight through transformers: the spec the batched scorer must match."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for q, p in zip(queries, passages):
            logits = model(**tok(q, p, truncation=True, max_length=max_length, return_tensors="pt")).logits[0]
            out.append(logits[0] if logits.numel() == 1 else logits[1] - logits[0])
    return torch.stack(out).float()


def test_scores_are_the_checkpoints_logits_per_pair(tiny_cross, pairs):
    qs, ps = pairs
    ce = CrossEncoder(tiny_cross, device="cpu", batch_size=5, max_length=MAX_LENGTH)
    scores = ce.score(qs, ps, progress=False)
    assert scores.dtype == torch.float32 and scores.shape == (len(qs),)
    expected = _reference(tiny_cross, qs, ps)
    assert expected.std() > 0.1  # pairs are told apart: the check below could not pass with a constant score
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_the_scores(tiny_cross, pairs):
    qs, ps = pairs
    by_batch = [CrossEncoder(tiny_cross, device="cpu", batch_size=b, max_length=MAX_LENGTH).score(qs, ps, progress=False)
                for b in (1, 7, 1000)]
    for scores in by_batch[1:]:
        torch.testing.assert_close(scores, by_batch[0], rtol=1e-5, atol=1e-5)


def test_two_label_checkpoint_scores_the_log_odds(tmp_path, dl19, pairs):
    path = make_tiny_cross_encoder(tmp_path / "two", _texts(dl19), num_labels=2)
    qs, ps = pairs[0][:12], pairs[1][:12]
    scores = CrossEncoder(path, device="cpu", max_length=MAX_LENGTH).score(qs, ps, progress=False)
    torch.testing.assert_close(scores, _reference(path, qs, ps), rtol=1e-5, atol=1e-5)


def test_rerank_scores_every_candidate_whatever_the_order(tiny_cross, dl19):
    ce = CrossEncoder(tiny_cross, device="cpu", batch_size=4, max_length=MAX_LENGTH)
    run = ce.rerank(dl19.queries, dl19.passages, dl19.candidates, progress=False)
    assert run.keys() == {q for q, c in dl19.candidates.items() if c}
    assert all(run[q].keys() == dl19.candidates[q].keys() for q in run)
    q = next(iter(run))
    pids = list(run[q])
    torch.testing.assert_close(torch.tensor([run[q][p] for p in pids]),
                               _reference(tiny_cross, [dl19.queries[q]] * len(pids), [dl19.passages[p] for p in pids]),
                               rtol=1e-5, atol=1e-5)
    shuffled = {q: dict(reversed(list(dl19.candidates[q].items()))) for q in reversed(list(dl19.candidates))}
    again = ce.rerank(dict(reversed(list(dl19.queries.items()))), dl19.passages, shuffled, progress=False)
    assert again.keys() == run.keys()
    for q in run:
        assert again[q] == pytest.approx(run[q], rel=1e-5, abs=1e-5)


def test_empty_input_scores_nothing(tiny_cross):
    ce = CrossEncoder(tiny_cross, device="cpu")
    empty = ce.score([], [], progress=False)
    assert empty.shape == (0,) and empty.dtype == torch.float32
    assert ce.rerank({}, {}, {}) == {}
    assert ce.rerank({"q": "text"}, {}, {"q": {}}) == {}


def test_bad_input_is_a_clear_error(tiny_cross):
    ce = CrossEncoder(tiny_cross, device="cpu")
    with pytest.raises(ValueError, match="must pair up: got 2 queries and 1 passages"):
        ce.score(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="passages must all be strings"):
        ce.score(["a"], [3])
    with pytest.raises(TypeError, match="queries must be a sequence of strings, not one string"):
        ce.score("ab", ["c", "d"])
    with pytest.raises(ValueError, match="passages: 1 candidate documents have no text, e.g. \\['p9'\\]"):
        ce.rerank({"q": "text"}, {"p1": "a"}, {"q": {"p1": 1.0, "p9": 0.5}})
    with pytest.raises(ValueError, match="queries: 1 queries with candidates have no text"):
        ce.rerank({}, {"p1": "a"}, {"q": {"p1": 1.0}})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        CrossEncoder(tiny_cross, batch_size=0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 3"):
        CrossEncoder(tiny_cross, max_length=2)


def test_a_checkpoint_that_is_not_a_cross_encoder_is_refused(tmp_path, tiny_cross):
    with pytest.raises(FileNotFoundError, match="model: .* is not a local transformers model directory"):
        CrossEncoder(tmp_path)
    bare = make_tiny_bert(tmp_path / "bare", ["some text"])
    with pytest.raises(ValueError, match="not a sequence-classification checkpoint \\(its config names BertModel\\)"):
        CrossEncoder(bare)
    # a config that names no architecture: the weights show the head is missing
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a trained sequence-classification checkpoint: its weights lack classifier"):
        CrossEncoder(bare)
    three = make_tiny_cross_encoder(tmp_path / "three", ["some text"], num_labels=3)
    with pytest.raises(ValueError, match="has 3 labels; a relevance score needs 1"):
        CrossEncoder(three)
    with pytest.raises(ValueError, match="model: a local cross-encoder directory is required"):
        CrossEncoder(None)


def test_untrained_keeps_the_encoder_weights_and_says_so(tmp_path, dl19):
    import fastrank
    from transformers import AutoModel

    bare = make_tiny_bert(tmp_path / "bare", _texts(dl19))
    ce = fastrank.CrossEncoder.untrained(bare, device="cpu")
    assert fastrank.CrossEncoder is CrossEncoder
    assert not ce.trained and ce.num_labels == 1
    assert CrossEncoder(make_tiny_cross_encoder(tmp_path / "ce", ["x"]), device="cpu").trained
    body = ce.model.base_model.state_dict()
    for name, weight in AutoModel.from_pretrained(str(bare), local_files_only=True).state_dict().items():
        assert torch.equal(body[name], weight), name
    scores = ce.score(["a query"] * 3, list(dl19.passages.values())[:3], progress=False)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
