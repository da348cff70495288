"""A trained model directory, as ``fastrank train`` writes it and ``--model DIR`` reads it everywhere.

Layout::

    DIR/fastrank_model.json   manifest: scorer, pooling, max lengths, base model, training summary, head sha256
    DIR/encoder/              the transformer (save_pretrained: config, weights, tokenizer)
    DIR/head.pt               the scorer head's state_dict (maxsim: {"projection"}; lite: a LiteScorer's)

Paths inside the manifest are relative to DIR, so a directory can be copied or moved as a whole.

The manifest is also the list of files fastrank owns in DIR (``files``: every file under ``encoder/`` and
``head.pt``, with their sha256), vouched for by ``written_by`` and ``meta_sha256`` as an index's meta.json
is (:mod:`fastrank.index.storage`). ``fastrank train`` marks its OUT from the first byte it writes with
``fastrank_run.json``, naming what the run owns (``checkpoint.pt``, the default ``cache/``), so a run that
stopped before its model was saved is still recognised. Nothing is written into DIR unless DIR is absent,
empty or such a directory, and a save replaces or removes only files those manifests own: a user's own
``head.pt``, ``encoder/`` or notes beside a model are refused or left alone, never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrank.index.storage import WRITER, meta_checksum, sha256_file

MANIFEST = "fastrank_model.json"
FORMAT, VERSION = "fastrank-model", 1
SCORERS = ("dense", "maxsim", "lite")
ENCODER_DIR, HEAD_FILE = "encoder", "head.pt"
RUN_MANIFEST = "fastrank_run.json"
RUN_FORMAT, RUN_VERSION = "fastrank-train-run", 1
# What save_trained writes into DIR: the names it checks before writing anything.
MODEL_ENTRIES = (ENCODER_DIR, HEAD_FILE, MANIFEST)


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


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def _trusted(meta) -> bool:
    """A manifest fastrank wrote and nobody edited: ``written_by`` and ``meta_sha256`` check out."""
    return meta.get("written_by") == WRITER and meta.get("meta_sha256") == meta_checksum(meta)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _model_owned(path: Path) -> set[str] | None:
    """The files (relative posix paths) a trained model's manifest owns, or None when ``path`` holds no
    manifest that can be trusted. A manifest from before ``files`` was recorded (no ``written_by``) is
    trusted by its format alone, owning what save_trained then wrote: the head and every file of encoder/."""
    meta = _read_json(path / MANIFEST)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        return None
    if "written_by" not in meta and "meta_sha256" not in meta:
        encoder = path / ENCODER_DIR
        files = [p.relative_to(path).as_posix() for p in encoder.rglob("*") if p.is_file()] if encoder.is_dir() else []
        return {MANIFEST, HEAD_FILE, *files}
    files = meta.get("files")
    if not _trusted(meta) or not isinstance(files, dict) or not all(
            isinstance(f, str) and all(_plain_name(part) for part in f.split("/")) for f in files):
        return None
    return {MANIFEST, *files}


def _run_owned(path: Path) -> set[str] | None:
    """The entries (files or whole directories, by name) a training run's manifest owns, or None."""
    meta = _read_json(path / RUN_MANIFEST)
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT or meta.get("version") != RUN_VERSION:
        return None
    owns = meta.get("owns")
    if not _trusted(meta) or not isinstance(owns, list) or not all(_plain_name(name) for name in owns):
        return None
    return {RUN_MANIFEST, *owns}


def _is_owned(path: Path, name: str, owned: set[str]) -> bool:
    """Entry ``name`` of ``path`` is fastrank's: owned by name, or a directory all of whose files are owned."""
    entry = path / name
    if name in owned:
        return True
    if entry.is_dir() and not entry.is_symlink():
        return all(p.relative_to(path).as_posix() in owned for p in entry.rglob("*")
                   if not p.is_dir() or p.is_symlink())
    return False


def check_model_dir(path: str | os.PathLike, names=MODEL_ENTRIES, label: str = "out", adopt=()) -> set[str]:
    """Refuse to write the entries ``names`` into ``path`` unless it is absent, empty, a trained model or a
    training run fastrank wrote (recognised by their manifests), and unless each of ``names`` already there
    is owned by them. ``adopt``: entries the caller vouches for (a ``--resume`` of a run started before run
    manifests existed). Returns what the manifests own. ``label`` names the argument in errors. Nothing is
    read but the manifests and the directory listing, so it runs before any model loads."""
    if os.fspath(path) == "":
        raise ValueError(f"{label} is empty; name the directory to write the trained model to")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {path}: exists and is not a directory; expected a directory for the trained model")
    present = {e.name for e in path.iterdir()} if path.is_dir() else set()
    if not present:
        return set()
    model, run = _model_owned(path), _run_owned(path)
    if model is None and run is None and not adopt:
        what = "a manifest fastrank cannot trust (edited, or another version's)" if {MANIFEST, RUN_MANIFEST} & present \
            else "files and no trained fastrank model or training run"
        raise ValueError(f"{label} {path}: the directory holds {what}; refusing to write into it (pick a new or "
                         "empty directory, or one fastrank train wrote)")
    owned = (model or set()) | (run or set()) | set(adopt)
    for name in sorted(set(names) & present):
        if not _is_owned(path, name, owned):
            raise ValueError(f"{label} {path}: {name} is not fastrank's (no manifest there names it); refusing to "
                             "overwrite it (move it away or pick another directory)")
    return owned


def write_run_manifest(path: str | os.PathLike, owns) -> None:
    """Mark ``path`` as a training run owning the entries ``owns`` (kept with those an earlier run owned), by
    an atomic rename, before the run writes anything else there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": RUN_FORMAT, "version": RUN_VERSION, "written_by": WRITER,
            "owns": sorted(((_run_owned(path) or set()) - {RUN_MANIFEST}) | set(owns))}
    meta["meta_sha256"] = meta_checksum(meta)
    tmp = _new_entry(path, RUN_MANIFEST, directory=False)
    try:
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, path / RUN_MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def _new_entry(path: Path, name: str, directory: bool) -> Path:
    """A fresh hidden ``.<name>.partial-<pid>-<hex>`` in ``path``, made here rather than by tempfile (whose
    entries are private, 0600/0700) so that what is renamed into place gets the permissions of any new file."""
    for _ in range(100):
        entry = path / f".{name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            entry.mkdir() if directory else entry.open("x").close()
            return entry
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: cannot create a temporary entry for {name}")


def _remove_owned(entry: Path, prefix: str, owned: set[str]) -> None:
    """Remove the files under ``entry`` that ``owned`` lists as ``prefix/<relative path>``, then the
    directories left empty; anything else stays where it is."""
    for p in sorted(entry.rglob("*"), reverse=True):
        rel = f"{prefix}/{p.relative_to(entry).as_posix()}"
        if p.is_symlink() or p.is_file():
            if rel in owned:
                p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    if entry.is_dir() and not any(entry.iterdir()):
        entry.rmdir()


def save_trained(out: str | os.PathLike, *, scorer: str, model, tokenizer, head_state: dict, pooling: str,
                 query_max_length: int, doc_max_length: int, base_model: str, training: dict) -> Path:
    """Write a trained model directory (see the module docstring); returns its path. ``out`` must be absent,
    empty, or a trained model or training run fastrank wrote; a model saved there before is replaced, and
    only its own files are removed."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    old = check_model_dir(out, MODEL_ENTRIES, "out")
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged = [_new_entry(out, ENCODER_DIR, directory=True), _new_entry(out, HEAD_FILE, directory=False),
              _new_entry(out, MANIFEST, directory=False)]
    encoder, head, manifest_file = staged
    aside = None
    try:
        model.save_pretrained(str(encoder))
        tokenizer.save_pretrained(str(encoder))
        torch.save({k: v.detach().cpu() for k, v in head_state.items()}, head)
        files = {f"{ENCODER_DIR}/{p.relative_to(encoder).as_posix()}": sha256_file(p)
                 for p in sorted(encoder.rglob("*")) if p.is_file()}
        files[HEAD_FILE] = sha256_file(head)
        manifest = {"format": FORMAT, "version": VERSION, "scorer": scorer, "pooling": pooling,
                    "query_max_length": query_max_length, "doc_max_length": doc_max_length,
                    "encoder": ENCODER_DIR, "head": HEAD_FILE, "head_sha256": files[HEAD_FILE],
                    "base_model": base_model, "training": training, "written_by": WRITER, "files": files}
        # The checksum is of the manifest as it will be read back (tuples as lists, keys as strings).
        manifest = json.loads(json.dumps(manifest))
        manifest["meta_sha256"] = meta_checksum(manifest)
        manifest_file.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        # The head goes first and the manifest last: in between, the old manifest's head_sha256 refuses the
        # new head, so a crash leaves a directory load_trained rejects, never an old head on a new encoder.
        os.replace(head, out / HEAD_FILE)
        if (out / ENCODER_DIR).exists():  # a directory cannot be renamed over a non-empty one
            aside = _new_entry(out, ENCODER_DIR, directory=True)
            os.replace(out / ENCODER_DIR, aside)
        os.replace(encoder, out / ENCODER_DIR)
        os.replace(manifest_file, out / MANIFEST)
    except BaseException:
        if aside is not None and not (out / ENCODER_DIR).exists():
            os.replace(aside, out / ENCODER_DIR)
            aside = None
        for entry in staged:  # this save's own temporary entries (fresh names), wherever it stopped
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()
            except OSError:
                pass  # not empty: what is there stays
        raise
    if aside is not None:
        _remove_owned(aside, ENCODER_DIR, old)
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    """The checked manifest of a trained model directory, without loading its weights."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not a trained fastrank model (no {MANIFEST}); `fastrank train` writes one")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainedModelError(f"{path / MANIFEST}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrainedModelError(f"{path / MANIFEST}: not a fastrank model manifest")
    if manifest.get("version") != VERSION:
        raise TrainedModelError(f"{path / MANIFEST}: version {manifest.get('version')!r}, this fastrank reads {VERSION}")
    missing = [k for k in ("scorer", "pooling", "query_max_length", "doc_max_length", "head_sha256") if k not in manifest]
    if missing or manifest["scorer"] not in SCORERS:
        raise TrainedModelError(f"{path / MANIFEST}: missing {missing} or unknown scorer {manifest.get('scorer')!r}")
    return manifest


def load_trained(path: str | os.PathLike) -> TrainedModel:
    """Read a directory written by :func:`save_trained` (``fastrank train``), checking the head's checksum."""
    path = Path(path)
    manifest = read_manifest(path)
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
