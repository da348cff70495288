"""What every saved fastrank directory shares: ``meta.json`` (format, version, parameters) and a sha256 of
each file beside it, checked before anything is read. Used by the dense and token indexes, the trained
model directory and the CLI's ``encoder.json``."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable


class IndexFormatError(ValueError):
    """A saved index is missing, corrupt, or does not match its metadata."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: Path, fmt: str | None, required: Iterable[str] = (), version: int | None = None,
              old_version_hint: str = "") -> dict:
    """``path/meta.json`` of a saved index of format ``fmt`` (any when None) and ``version``, with the
    ``required`` keys; an older version's error ends with ``old_version_hint`` (how to rebuild), a newer
    one's says so."""
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no saved index here (not a directory)")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise IndexFormatError(f"{path}: missing meta.json; not a saved fastrank index")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{meta_file}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(meta, dict) or (fmt is not None and meta.get("format") != fmt):
        raise IndexFormatError(f"{meta_file}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                               f"expected {fmt!r}")
    found = meta.get("version")
    if version is not None and found != version:
        older = isinstance(found, int) and found < version
        raise IndexFormatError(
            f"{meta_file}: {fmt} format version {found!r}, this fastrank reads version {version}"
            + ((f"; {old_version_hint}" if old_version_hint else "") if older else "; it was written by a newer fastrank"))
    missing = [key for key in required if key not in meta]
    if missing:
        raise IndexFormatError(f"{meta_file}: missing {', '.join(missing)}")
    if not isinstance(meta.get("sha256", {}), dict):
        raise IndexFormatError(f"{meta_file}: sha256 is not a mapping of file names to checksums")
    return meta


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


def write_attached(path: Path, attach: dict[str, str] | None) -> dict[str, str]:
    """Write ``attach`` (file name -> text) into ``path``; their checksums, for meta.json."""
    sums = {}
    for name, text in (attach or {}).items():
        if Path(name).name != name or name in ("meta.json",):
            raise ValueError(f"attach: {name!r} must be a plain file name other than meta.json")
        (path / name).write_text(text)
        sums[name] = sha256_file(path / name)
    return sums


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
