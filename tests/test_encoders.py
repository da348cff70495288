import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastrank.encoders import Encoder, TokenEmbeddings  # noqa: E402
from tiny_bert import make_tiny_bert  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog", "fleas live up to a year on their hosts, feeding on blood",
         "unknownword appears here", "x"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), TEXTS)


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder(tiny_model, device="cpu", batch_size=2)


def manual_forward(encoder, texts, max_length):
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder.model(**batch).last_hidden_state, batch["attention_mask"].bool()


def test_mean_and_cls_pooling_match_the_model(tiny_model, encoder):
    hidden, mask = manual_forward(encoder, TEXTS, 256)
    m = mask.unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    got = encoder.encode_dense(TEXTS, progress=False)
    assert got.shape == (len(TEXTS), 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, mean, rtol=1e-4, atol=1e-5)
    cls = Encoder(tiny_model, pooling="cls", normalize=False, device="cpu").encode_dense(TEXTS, progress=False)
    torch.testing.assert_close(cls, hidden[:, 0], rtol=1e-4, atol=1e-5)


def test_batching_and_length_sorting_keep_input_order(tiny_model, encoder):
    one = Encoder(tiny_model, device="cpu", batch_size=1).encode(TEXTS, tokens=True, progress=False)
    many = encoder.encode(TEXTS, tokens=True, progress=False)
    torch.testing.assert_close(one.dense, many.dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one.tokens.offsets, many.tokens.offsets)
    torch.testing.assert_close(one.tokens.vectors, many.tokens.vectors, rtol=1e-4, atol=1e-5)


def test_token_embeddings_ragged_layout_and_truncation(encoder):
    hidden, mask = manual_forward(encoder, TEXTS, 32)
    tok = encoder.encode_queries(TEXTS, progress=False)
    assert tok.lengths.tolist() == mask.sum(1).tolist()
    emb, emb_mask = tok.padded()
    torch.testing.assert_close(emb_mask, mask)
    ref = torch.nn.functional.normalize(hidden, dim=-1)
    torch.testing.assert_close(emb[emb_mask], ref[mask], rtol=1e-4, atol=1e-5)
    long_text = ["word " * 400]
    assert encoder.encode_queries(long_text, progress=False).lengths.tolist() == [32]
    assert encoder.encode_docs(long_text, progress=False).lengths.tolist() == [200]


def test_padded_subset_and_dtype():
    vectors = torch.randn(6, 4)
    tok = TokenEmbeddings(vectors, torch.tensor([0, 1, 1, 6]))  # the middle text has no token
    emb, mask = tok.padded([2, 1, 0], dtype=torch.float16)
    assert emb.shape == (3, 5, 4) and emb.dtype == torch.float16
    assert mask.sum(1).tolist() == [5, 0, 1]
    torch.testing.assert_close(emb[0], vectors[1:].half())
    with pytest.raises(ValueError, match="offsets end at 6 but vectors has 5 rows"):
        TokenEmbeddings(vectors[:5], torch.tensor([0, 1, 1, 6]))
    with pytest.raises(ValueError, match="non-decreasing"):
        TokenEmbeddings(vectors, torch.tensor([0, 4, 1, 6]))


def test_projection(tiny_model, tmp_path):
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 8, bias=False)
    enc = Encoder(tiny_model, projection=proj, device="cpu")
    tok = enc.encode_docs(TEXTS, progress=False)
    assert enc.token_dim == 8 and tok.vectors.shape[1] == 8
    torch.testing.assert_close(tok.vectors.norm(dim=-1), torch.ones(tok.vectors.shape[0]))
    torch.save(proj.weight.detach(), tmp_path / "proj.pt")
    from_file = Encoder(tiny_model, projection=tmp_path / "proj.pt", device="cpu").encode_docs(TEXTS, progress=False)
    torch.testing.assert_close(from_file.vectors, tok.vectors)
    with pytest.raises(ValueError, match="projection: expects input dim 16, model hidden size is 32"):
        Encoder(tiny_model, projection=torch.zeros(8, 16), device="cpu")


def test_bad_arguments(tiny_model, encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local transformers model directory"):
        Encoder(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'cls'"):
        Encoder(tiny_model, pooling="max", device="cpu")
    with pytest.raises(TypeError, match="not one string"):
        encoder.encode("one text")
    with pytest.raises(ValueError, match="dense=True and/or tokens=True"):
        encoder.encode(TEXTS, dense=False)
