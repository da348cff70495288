"""A trained model directory, as ``fastrank train`` writes it and ``--model DIR`` reads it everywhere.

Layout::

    DIR/fastrank_model.json   manifest: scorer, pooling, max lengths, base model, training summary, head sha256
    DIR/encoder/              the transformer (save_pretrained: config, weights, tokenizer)
    DIR/head.pt               the scorer head's state_dict (maxsim: {"projection"}; lite: a LiteScorer's)

Paths inside the manifest are relative to DIR, so a directory can be copied or moved as a whole.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrank.index.storage import sha256_file

MANIFEST = "fastrank_model.json"
FORMAT, VERSION = "fastrank-model", 1
SCORERS = ("dense", "maxsim", "lite")
ENCODER_DIR, HEAD_FILE = "encoder", "head.pt"


class TrainedModelError(ValueError):
    """A directory claims to be a trained fastrank model but its manifest or files do not check out."""


def is_trained(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


@dataclass
class TrainedModel:
    """What :func:`load_trained` returns: the scorer's name and head, and how to build its encoder."""

    path: Path
    scorer: str
    pooling: str
    query_max_length: int
    doc_max_length: int
    projection: torch.Tensor | None
    lite: torch.nn.Module | None
    manifest: dict

    @property
    def encoder_path(self) -> Path:
        return self.path / ENCODER_DIR

    def encoder(self, device: str | torch.device | None = None, batch_size: int = 64,
                dtype: torch.dtype | None = None):
        """The :class:`fastrank.encoders.Encoder` this head was trained on: normalised tokens, projected by
        the MaxSim head's projection when the scorer is maxsim."""
        from fastrank.encoders import Encoder

        return Encoder(self.encoder_path, pooling=self.pooling, normalize=True, projection=self.projection,
                       device=device, dtype=dtype, batch_size=batch_size)


def save_trained(out: str | os.PathLike, *, scorer: str, model, tokenizer, head_state: dict, pooling: str,
                 query_max_length: int, doc_max_length: int, base_model: str, training: dict) -> Path:
    """Write a trained model directory (see the module docstring); returns its path."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / ENCODER_DIR))
    tokenizer.save_pretrained(str(out / ENCODER_DIR))
    torch.save({k: v.detach().cpu() for k, v in head_state.items()}, out / HEAD_FILE)
    manifest = {"format": FORMAT, "version": VERSION, "scorer": scorer, "pooling": pooling,
                "query_max_length": query_max_length, "doc_max_length": doc_max_length,
                "encoder": ENCODER_DIR, "head": HEAD_FILE, "head_sha256": sha256_file(out / HEAD_FILE),
                "base_model": base_model, "training": training}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def load_trained(path: str | os.PathLike) -> TrainedModel:
    """Read a directory written by :func:`save_trained` (``fastrank train``), checking the head's checksum."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not a trained fastrank model (no {MANIFEST}); `fastrank train` writes one")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise TrainedModelError(f"{path / MANIFEST}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrainedModelError(f"{path / MANIFEST}: not a fastrank model manifest")
    if manifest.get("version") != VERSION:
        raise TrainedModelError(f"{path / MANIFEST}: version {manifest.get('version')!r}, this fastrank reads {VERSION}")
    missing = [k for k in ("scorer", "pooling", "query_max_length", "doc_max_length", "head_sha256") if k not in manifest]
    if missing or manifest["scorer"] not in SCORERS:
        raise TrainedModelError(f"{path / MANIFEST}: missing {missing} or unknown scorer {manifest.get('scorer')!r}")
    head_file = path / HEAD_FILE
    if not head_file.is_file() or not (path / ENCODER_DIR / "config.json").is_file():
        raise TrainedModelError(f"{path}: {HEAD_FILE} or {ENCODER_DIR}/config.json is missing")
    if sha256_file(head_file) != manifest["head_sha256"]:
        raise TrainedModelError(f"{head_file}: checksum differs from the manifest's (the file was changed or truncated)")
    state = torch.load(head_file, map_location="cpu", weights_only=True)
    projection = lite = None
    if manifest["scorer"] == "maxsim":
        projection = state["projection"]
    elif manifest["scorer"] == "lite":
        from fastrank.nn import LiteScorer

        lite = LiteScorer.from_state_dict(state)
    return TrainedModel(path, manifest["scorer"], manifest["pooling"], int(manifest["query_max_length"]),
                        int(manifest["doc_max_length"]), projection, lite, manifest)
