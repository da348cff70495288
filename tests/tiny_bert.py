"""A tiny BERT (2 layers, hidden 32) with a word-level vocabulary built from the test texts, written
to a local directory: what the encoder and CLI tests load instead of a downloaded model; and the same
with a one-logit sequence-classification head, for the cross-encoder tests."""
from __future__ import annotations

import inspect
import re
import string
from pathlib import Path
from typing import Iterable

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_tokenizer(path: Path, texts: Iterable[str]) -> int:
    """A word-level BertTokenizerFast over ``texts`` saved in ``path``; returns the vocabulary size."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+", t.lower())})
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIAL + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + words
    vocab = list(dict.fromkeys(vocab))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab`, 4.x as `vocab_file`.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    source = {"vocab": {w: i for i, w in enumerate(vocab)}} if "vocab" in params else {"vocab_file": str(path / "vocab.txt")}
    BertTokenizerFast(**source, do_lower_case=True).save_pretrained(str(path))
    return len(vocab)


def _save_tiny(model_class, path: Path, texts: Iterable[str], hidden: int, seed: int, **config) -> Path:
    import torch
    from transformers import BertConfig

    vocab_size = _write_tokenizer(path, texts)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=256, **config)
    model_class(config).eval().save_pretrained(str(path))
    return path


def make_tiny_bert(path: Path, texts: Iterable[str] = (), hidden: int = 32, seed: int = 0) -> Path:
    from transformers import BertModel

    return _save_tiny(BertModel, path, texts, hidden, seed)


def make_tiny_cross_encoder(path: Path, texts: Iterable[str] = (), hidden: int = 32, seed: int = 0,
                            num_labels: int = 1) -> Path:
    """A BertForSequenceClassification with ``num_labels`` labels (random weights, its head included), the
    tokenizer of :func:`make_tiny_bert`."""
    from transformers import BertForSequenceClassification

    # BERT's initializer_range (0.02) gives every pair nearly the same logit; 0.5 spreads them over a few
    # units, so a test that compares scores can tell pairs apart.
    return _save_tiny(BertForSequenceClassification, path, texts, hidden, seed, num_labels=num_labels,
                      initializer_range=0.5)


def beir_training_folder(root: Path, corpus: dict[str, str]) -> tuple[Path, str]:
    """A BEIR training folder in ``root`` over ``corpus`` (the SciFact slice): its first 40 documents each
    get a query of a few of their own words, judged 1, so a head can learn something real in a few steps;
    and a tiny BERT over the texts. Returns (root, the model's path)."""
    import json

    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in corpus.items()))
    docs = list(corpus)[:40]
    queries = {f"q{i}": " ".join(corpus[d].split()[3:11]) for i, d in enumerate(docs)}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"q{i}\t{d}\t1\n" for i, d in enumerate(docs)))
    return root, str(make_tiny_bert(root / "model", list(corpus.values())))


def small_train_config(beir: tuple[Path, str], out, **overrides):
    """A TrainConfig for ``fastrank train`` on :func:`beir_training_folder`'s folder that runs in seconds on
    a CPU (4 queries a batch, 4 negatives mined from the top 20, 8 queries held out); ``overrides`` win."""
    from fastrank.train.config import TrainConfig

    root, model = beir
    base = dict(data=str(root), out=str(out), model=model, device="cpu", batch_size=4, negatives=4, mine_depth=20,
                dev_queries=8, progress=False, cache_dir=str(root / "cache"))
    return TrainConfig(**(base | overrides))
