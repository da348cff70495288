"""A tiny BERT (2 layers, hidden 32) with a word-level vocabulary built from the test texts, written
to a local directory: what the encoder and CLI tests load instead of a downloaded model."""
from __future__ import annotations

import inspect
import re
import string
from pathlib import Path
from typing import Iterable

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_bert(path: Path, texts: Iterable[str] = (), hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

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
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=256)
    BertModel(config).eval().save_pretrained(str(path))
    return path
