"""What every saved fastrank index directory shares: ``meta.json``, its manifest, and how a directory is
written and replaced without touching files fastrank did not write.

The manifest is ``meta.json`` itself: ``format`` and ``version`` say what the directory holds,
``written_by: "fastrank"`` marks it as fastrank's, ``sha256`` maps every other file the index owns to its
checksum, and ``meta_sha256`` is the sha256 of the canonical JSON of all the other fields. One file rather
than a manifest beside meta.json, because one file is published by one atomic rename, so the manifest and
the metadata it vouches for can never disagree on disk; the files it owns are the keys of ``sha256``, so
the set of files replaced and the set of files checked cannot disagree either. Canonical JSON (sorted keys,
no whitespace) lets a tool reformat the file, while any changed value fails the checksum.

Saving (:func:`save_index_dir`) is crash-safe in the way Lucene commits are: every file is written under a
temporary name and fsynced, renamed into place, and ``meta.json`` is published last by an atomic rename; files
the old index owned and the new one does not are removed only after that. A crash before the rename leaves
the old ``meta.json``, and a load then fails on a checksum (never a mix read as an index); a rerun replaces it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

META = "meta.json"
WRITER = "fastrank"
# Formats whose directories a save may replace: a dense index may become a token index and back.
INDEX_FORMATS = ("fastrank.DenseIndex", "fastrank.TokenIndex", "fastrank.ShardedTokenIndex")
# A file being written by a save: ".<name>.partial-<pid>-<8 hex>" (data.atomic_output names its files so too).
PARTIAL_NAME = re.compile(r"\..+\.partial-(\d+)-[0-9a-f]{8}")


class IndexFormatError(ValueError):
    """A saved index is missing, corrupt, or does not match its metadata."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def meta_checksum(meta: dict) -> str:
    """sha256 of the canonical JSON of ``meta`` without its own ``meta_sha256``."""
    fields = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _is_plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def read_meta(path: Path, fmt: str | None, required: Iterable[str] = (), version: int | None = None,
              old_version_hint: str = "", legacy_version: int | None = None) -> dict:
    """``path/meta.json`` of a saved index of format ``fmt`` (any when None) and ``version``, with the
    ``required`` keys; an older version's error ends with ``old_version_hint`` (how to rebuild), a newer
    one's says so. ``legacy_version``, the version before manifests, still reads (its fields are validated
    like the current one's, but it carries no checksum of its own)."""
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no saved index here (not a directory)")
    meta_file = path / META
    if not meta_file.is_file():
        raise IndexFormatError(f"{path}: missing meta.json; not a saved fastrank index")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{meta_file}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(meta, dict) or (fmt is not None and meta.get("format") != fmt):
        raise IndexFormatError(f"{meta_file}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                               f"expected {fmt!r}")
    found = meta.get("version")
    if version is not None and found != version and not (legacy_version is not None and found == legacy_version):
        older = isinstance(found, int) and found < version
        raise IndexFormatError(
            f"{meta_file}: {fmt} format version {found!r}, this fastrank reads version {version}"
            + ((f"; {old_version_hint}" if old_version_hint else "") if older else "; it was written by a newer fastrank"))
    missing = [key for key in required if key not in meta]
    if missing:
        raise IndexFormatError(f"{meta_file}: missing {', '.join(missing)}")
    sums = meta.get("sha256", {})
    if not isinstance(sums, dict) or not all(_is_plain_name(k) and k != META and isinstance(v, str)
                                             for k, v in sums.items()):
        raise IndexFormatError(f"{meta_file}: sha256 is not a mapping of plain file names to checksums")
    if version is not None and found == version:
        if meta.get("written_by") != WRITER:
            raise IndexFormatError(f"{meta_file}: written_by is {meta.get('written_by')!r}, expected {WRITER!r}")
        if not isinstance(meta.get("meta_sha256"), str):
            raise IndexFormatError(f"{meta_file}: missing meta_sha256 (the checksum of meta.json's own fields)")
    return meta


def verify_meta_checksum(path: Path, meta: dict) -> None:
    """meta.json's fields match its ``meta_sha256`` (absent only in a legacy index, which read_meta allowed).
    Loaders call it after checking each field against the files it describes, so that an edit those checks
    catch is reported by name; this catches the rest (an ``ef_search`` or ``nprobe`` changed by hand)."""
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_checksum(meta):
        raise IndexFormatError(f"{path / META}: its fields do not match its meta_sha256 (meta.json was edited or is "
                               "corrupt); rebuild the index, or save it again from Python to change a setting")


def verify_files(path: Path, meta: dict, files: Iterable[Path]) -> None:
    """Each of ``files``, and every other file ``meta.json`` lists a checksum for (such as an attached
    ``encoder.json``), exists and matches its checksum."""
    listed = [path / name for name in meta.get("sha256", {})]
    for f in dict.fromkeys([*files, *listed]):
        if not f.is_file():
            raise IndexFormatError(f"{path}: missing {f.name}")
        expected = meta.get("sha256", {}).get(f.name)
        if expected != sha256_file(f):
            raise IndexFormatError(f"{f}: checksum does not match meta.json (file corrupt or from another index)")


# -- validating meta.json's fields ---------------------------------------------------------------------
def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def meta_field(meta_file: Path, fields: dict, name: str, ok: Callable[[object], bool], expected: str,
               prefix: str = ""):
    """``fields[name]`` when ``ok`` accepts it, else an IndexFormatError naming the field (``prefix`` gives
    the path of a nested one, such as ``params.``) and what was expected."""
    value = fields.get(name)
    if not ok(value):
        raise IndexFormatError(f"{meta_file}: field {prefix}{name} must be {expected}, got {value!r}; rebuild the "
                               "index if meta.json was edited")
    return value


def positive_int(value) -> bool:
    return is_int(value) and value >= 1


def optional_positive_int(value) -> bool:
    return value is None or positive_int(value)


def check_ids(ids_file: Path, ids, count: int, count_field: str, id_type: str | None = None) -> list:
    """``ids`` as read from ``ids_file``: a list of ``count`` (meta.json's ``count_field``) distinct ints and
    strings, all ints when ``id_type`` is ``"int"``."""
    if not isinstance(ids, list) or len(ids) != count:
        size = f"{len(ids)} ids" if isinstance(ids, list) else f"a {type(ids).__name__}, not a list of ids,"
        raise IndexFormatError(f"{ids_file}: {size} but meta.json says {count_field}={count}")
    bad = next((i for i in ids if not (is_int(i) or isinstance(i, str))), None)
    if bad is not None:
        raise IndexFormatError(f"{ids_file}: id {bad!r} is neither an integer nor a string")
    if id_type is not None and id_type != ("int" if all(is_int(i) for i in ids) else "str"):
        raise IndexFormatError(f"{ids_file}: the ids do not match meta.json's id_type {id_type!r}")
    try:
        check_unique_ids(ids, set())
    except ValueError as exc:
        raise IndexFormatError(f"{ids_file}: {exc}") from None
    return ids


# -- writing and replacing an index directory ----------------------------------------------------------
# Where a streamed build that will replace a complete index is written until it is complete
# (fastrank.index.token_stream): inside the directory, so that it is on the same filesystem for the renames.
STAGING_DIR = ".fastrank-building"


def _is_partial(name: str) -> bool:
    return PARTIAL_NAME.fullmatch(name) is not None or name == STAGING_DIR


def _owned_by_manifest(path: Path) -> set[str] | None:
    """The files the index in ``path`` owns (meta.json and the keys of its sha256), or None when ``path``
    holds no fastrank index manifest that can be trusted: a meta.json of another format, one whose
    checksum fails (its list of files may be an edit), or none at all."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") not in INDEX_FORMATS or not is_int(meta.get("version")):
        return None
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or not all(_is_plain_name(name) for name in sums):
        return None
    # An index saved before manifests (no written_by) is trusted by its format alone: its sha256 names the
    # same files, so it can be replaced without asking the user to delete it first.
    if "written_by" in meta or "meta_sha256" in meta:
        if meta.get("written_by") != WRITER or meta.get("meta_sha256") != meta_checksum(meta):
            return None
    # A streamed index (fastrank.index.columns) also owns its column files, complete or still being built.
    columns = meta.get("columns", {})
    if not isinstance(columns, dict) or not all(_is_plain_name(name) for name in columns):
        return None
    # A sharded index owns its stage-1 and shard directories (never removed as files: see save_index_dir).
    dirs = meta.get("dirs", [])
    if not isinstance(dirs, list) or not all(_is_plain_name(name) for name in dirs):
        return None
    large = meta.get("large_files", {})
    if not isinstance(large, dict) or not all(_is_plain_name(name) for name in large):
        return None
    return {META, *sums, *columns, *dirs, *large}


def check_index_dir(path: str | os.PathLike, names: Iterable[str] = (), label: str = "path") -> set[str]:
    """Refuse to save an index into ``path`` unless it is absent, empty, or an index fastrank saved, and
    unless every file of ``names`` (what the save writes) is absent or owned by that index. Returns the
    files the old index owns (empty when there is none). ``label`` names the argument in errors."""
    if os.fspath(path) == "":
        raise ValueError(f"{label} is empty; name the directory to save the index in")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {path}: exists and is not a directory; expected a directory for the index")
    present = {e.name for e in path.iterdir() if not _is_partial(e.name)} if path.is_dir() else set()
    if not present:
        return set()
    owned = _owned_by_manifest(path)
    if owned is None:
        what = "a meta.json that is not a fastrank index manifest (or was edited)" if META in present else \
            "files and no fastrank index"
        raise ValueError(f"{label} {path}: the directory holds {what}; refusing to write into it (pick a new or "
                         "empty directory, or one holding an index fastrank saved)")
    foreign = sorted((set(names) | {META}) & (present - owned))
    if foreign:
        raise ValueError(f"{label} {path}: {foreign[0]} is not a file of the index saved there; refusing to "
                         "overwrite it (move it away or pick another directory)")
    return owned


def check_not_inside(path: str | os.PathLike, inputs: dict[str, str | os.PathLike], label: str = "OUT") -> None:
    """Refuse an input file that lies inside the output directory ``path``: writing the output there
    would put what was read and what is written in one place."""
    out = Path(path).resolve()
    for name, value in inputs.items():
        if value is not None and Path(value).resolve().is_relative_to(out):
            raise ValueError(f"{name} {value}: inside {label} {path}; keep inputs out of the index directory")


def fsync_path(path: Path, directory: bool = False) -> None:
    if directory and not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a directory to sync it
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_name(path: Path, name: str) -> Path:
    """A new empty temporary file in ``path`` for staging ``name`` (a crash leaves it recognisably partial)."""
    for _ in range(100):
        tmp = path / f".{name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            tmp.open("x").close()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: cannot create a temporary file for {name}")


def write_npy(array) -> Callable[[Path], None]:
    """A writer for :func:`save_index_dir` saving ``array`` as ``.npy`` at exactly the path given (``np.save``
    given a name appends ``.npy`` to a temporary name)."""
    import numpy as np

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return write


def save_index_dir(path: str | os.PathLike, writers: dict[str, Callable[[Path], None]], meta: dict,
                   attach: dict[str, str] | None = None) -> Path:
    """Save an index into directory ``path`` (see the module docstring): ``writers`` maps each file name to
    a function writing that file at the path it is given; ``attach`` (name -> text) adds files of the
    caller's (the CLI's ``encoder.json``). ``meta`` gets ``written_by``, ``sha256`` and ``meta_sha256``."""
    writers = dict(writers)
    for name, text in (attach or {}).items():
        if not _is_plain_name(name) or name == META or name in writers:
            raise ValueError(f"attach: {name!r} must be a plain file name other than meta.json and the index's "
                             f"own files ({', '.join(writers)})")
        writers[name] = lambda p, text=text: p.write_text(text, encoding="utf-8")
    old = check_index_dir(path, writers)
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    renamed: list[str] = []
    try:
        for name, write in writers.items():
            staged[name] = partial_name(path, name)
            write(staged[name])
            fsync_path(staged[name])
        meta = meta | {"written_by": WRITER, "sha256": {name: sha256_file(tmp) for name, tmp in staged.items()}}
        meta["meta_sha256"] = meta_checksum(meta)
        staged[META] = partial_name(path, META)
        staged[META].write_text(json.dumps(meta, indent=1), encoding="utf-8")
        fsync_path(staged[META])
        # meta.json, staged last, is renamed last: until then a reader finds the old manifest, whose
        # checksums refuse any file already replaced.
        for name, tmp in staged.items():
            os.replace(tmp, path / name)
            renamed.append(name)
    except BaseException:
        # What this save made goes: its temporary files, the files it renamed into place where the old
        # index had none (check_index_dir made sure nothing else was there), and the directory if it made it.
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        for name in renamed:
            if name not in old:
                (path / name).unlink(missing_ok=True)
        if created:
            try:
                path.rmdir()
            except OSError:
                pass  # not empty: the old index's files, or files created meanwhile, stay
        raise
    fsync_path(path, directory=True)
    for name in sorted(old - set(staged)):
        if (path / name).is_file():  # never a directory, whatever an old manifest says
            (path / name).unlink()
    return path


def check_unique_ids(new: list, existing: set, name: str = "ids") -> None:
    """Refuse an id that repeats within ``new`` or is already in ``existing``: a later search could return
    only one of the documents, and the other would be lost without a word."""
    seen: set = set()
    for i in new:
        if i in existing:
            raise ValueError(f"{name}: {i!r} is already in the index (each document needs its own id)")
        if i in seen:
            raise ValueError(f"{name}: {i!r} appears twice (each document needs its own id)")
        seen.add(i)


def check_finite_rows(x, name: str, what: Callable[[int], str] | None = None, chunk_rows: int = 1 << 16) -> None:
    """Refuse a (N, dim) numpy array or tensor holding NaN or inf, naming ``name`` and the first bad row
    (``what(row)`` describes it, e.g. which query a token row belongs to). NaN ranks nowhere: a search with
    it returns -inf or missing hits, an index holding it returns wrong neighbours, and neither says so."""
    import numpy as np
    import torch

    for s in range(0, x.shape[0], chunk_rows):
        block = x[s:s + chunk_rows]
        if isinstance(block, torch.Tensor):
            bad = torch.nonzero(~torch.isfinite(block).all(dim=1))
            first = int(bad[0, 0]) if bad.numel() else None
        else:
            bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
            first = int(bad[0]) if bad.size else None
        if first is not None:
            row = s + first
            where = what(row) if what else f"row {row}"
            raise ValueError(f"{name}: {where} holds NaN or inf; every value must be finite")
