"""Append-only column files under an atomic manifest: how an index larger than RAM is written and read.

A streamed build appends each chunk of documents to a few raw column files (``tokens.bin``, ``codes.bin``,
``offsets.bin``, ...), fsyncs them, and only then publishes, by an atomic rename of ``meta.json``, how many
rows of each column are committed, with the sha256 of the bytes each chunk added. This is Lucene's commit
applied to columns: whatever happens between two commits (SIGKILL, a power cut, a full disk) leaves the last
``meta.json`` in place, and bytes past its committed lengths are an uncommitted tail that a resumed build
truncates before it appends again. A reader maps exactly the committed rows, so a half-written chunk is
never read as data, and a build still in progress (``state: "building"``) is refused as an index.

Small files written once (centroids, the residual codec, the inverted lists' offsets) are staged under a
temporary name, fsynced and renamed, and their whole-file sha256 goes into the manifest's ``sha256`` at the
next commit, as :mod:`fastrank.index.storage` does for a saved index. Column files are never rehashed whole:
each chunk's sha256 per column is recorded, so ``verify`` can check an index without the manifest growing
with anything but the number of chunks, and a load need not read the columns at all (see :func:`verify`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from fastrank.index.storage import (META, PARTIAL_NAME, STAGING_DIR, WRITER, IndexFormatError, check_index_dir, fsync_path,
                                    meta_checksum, partial_name, sha256_file)

# A chunk's per-column sha256 is recorded in the manifest; verify re-reads in blocks of this many bytes.
_READ_BLOCK = 1 << 24


class DiskFullError(OSError):
    """The disk filled while a chunk was being written; the last committed state is kept and resumable."""


def _disk_full_message(path: Path, what: str, committed: int) -> str:
    return (f"{path}: no space left on the device while writing {what}; the index keeps its last committed state "
            f"({committed} documents) and the same command resumes from there once space is freed")


class ColumnWriter:
    """Appends chunks of rows to the column files of directory ``path`` and commits them.

    ``columns`` maps each file name to ``(numpy dtype name, row width)``. ``header`` holds what the build
    was started with (the index's parameters); a build resumed on a directory whose header differs is
    refused, naming the first differing option. ``format`` names the index kind for the manifest.
    """

    def __init__(self, path: str | os.PathLike, *, format: str, version: int, columns: dict[str, tuple[str, int]],
                 header: dict, label: str = "path"):
        self.path = Path(path)
        self.format, self.version, self.label = format, version, label
        self.columns = {name: (np.dtype(dt), int(width)) for name, (dt, width) in columns.items()}
        self.header = header
        self._pending: dict[str, int] = {}
        self._pending_sums: dict = {}
        existing = self._read_existing()
        if existing is None:
            check_index_dir(self.path, list(self.columns), label=label)
            self.path.mkdir(parents=True, exist_ok=True)
            self.meta = {"format": format, "version": version, "state": "building", "header": header,
                         "columns": {name: 0 for name in self.columns}, "chunks": [], "sha256": {}, "extra": {},
                         "column_types": self._types()}
            for name in self.columns:
                # A fresh column starts empty; a stale file of an abandoned build that never committed is
                # ours (check_index_dir allowed it only as an index file) and is cut to nothing.
                with open(self.path / name, "wb"):
                    pass
            self.commit()
        else:
            self.meta = existing
            for name, rows in self.meta["columns"].items():
                dt, width = self.columns[name]
                f = self.path / name
                committed = rows * dt.itemsize * width
                if not f.is_file() or f.stat().st_size < committed:
                    raise IndexFormatError(f"{f}: shorter than its committed {rows} rows; the partial index is "
                                           "damaged: delete the directory and build again")
                os.truncate(f, committed)  # drop the uncommitted tail of an interrupted chunk
            remove_stale_partials(self.path)
        self._files = {name: open(self.path / name, "ab") for name in self.columns}

    # -- resuming ------------------------------------------------------------------------------------------
    def _read_existing(self) -> dict | None:
        f = self.path / META
        if not f.is_file():
            return None
        try:
            meta = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # check_index_dir will refuse the directory by name
        if not isinstance(meta, dict) or meta.get("format") != self.format or "header" not in meta:
            return None
        if meta.get("written_by") != WRITER or meta.get("meta_sha256") != meta_checksum(meta):
            raise IndexFormatError(f"{f}: the manifest of the partial build does not match its checksum; delete the "
                                   "directory and build again")
        if meta.get("state") == "complete":
            raise FileExistsError(f"{self.label} {self.path}: already holds a complete index; pick another directory "
                                  "(or remove this one) to build a new one")
        if meta.get("version") != self.version:
            raise IndexFormatError(f"{f}: a partial build of format version {meta.get('version')}, this fastrank "
                                   f"writes version {self.version}; delete the directory and build again")
        check_header(self.path, meta["header"], self.header, self.label)
        if meta.get("column_types") != self._types():
            raise ValueError(f"{self.label} {self.path}: the partial build's column files ({meta.get('column_types')}) "
                             f"differ from this run's ({self._types()}); pick another directory")
        return meta

    def _types(self) -> dict:
        return {k: [dt.name, width] for k, (dt, width) in self.columns.items()}

    @property
    def resumed(self) -> bool:
        return bool(self.meta["chunks"]) or bool(self.meta["sha256"])

    def rows(self, name: str) -> int:
        """Rows of column ``name`` committed so far plus those appended since the last commit."""
        return self.meta["columns"][name] + self._pending.get(name, 0)

    # -- writing -------------------------------------------------------------------------------------------
    def append(self, name: str, array: np.ndarray) -> None:
        """Append rows to column ``name`` (committed by the next :meth:`commit`)."""
        dt, width = self.columns[name]
        arr = np.ascontiguousarray(array)
        if arr.dtype != dt or (arr.size % width) != 0:
            raise TypeError(f"column {name}: expected rows of {width} {dt}, got {arr.dtype} {arr.shape}")
        data = memoryview(arr.reshape(-1).view(np.uint8))
        try:
            self._files[name].write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(errno.ENOSPC, _disk_full_message(self.path, name, self.committed_documents)) \
                    from None
            raise
        self._pending[name] = self._pending.get(name, 0) + arr.size // width
        self._pending_sums.setdefault(name, hashlib.sha256()).update(data)

    def write_file(self, name: str, write: Callable[[Path], None]) -> None:
        """Write a small file once (staged, fsynced, renamed); its checksum is published by the next commit."""
        if name in self.columns or name == META:
            raise ValueError(f"{name} is a column or the manifest")
        with self._staged(name) as tmp:
            write(tmp)
            fsync_path(tmp)
        self.meta["sha256"][name] = sha256_file(self.path / name)

    @contextlib.contextmanager
    def _staged(self, name: str):
        """A staged file for ``name``: renamed into place when the block ends, removed when it fails (a full
        disk named as :class:`DiskFullError`, the build resumable from its last commit)."""
        tmp = partial_name(self.path, name)
        try:
            yield tmp
            os.replace(tmp, self.path / name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(errno.ENOSPC, _disk_full_message(self.path, name, self.committed_documents)) \
                    from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_large_file(self, name: str, blocks, dtype: str) -> None:
        """Write a large file once from an iterable of arrays of ``dtype`` (staged, hashed as it is written,
        fsynced, renamed). It is mapped like a column at load and its sha256 is checked only by
        :func:`verify`, so that a load never reads it whole."""
        def fill(f) -> tuple[str, int]:
            h, rows = hashlib.sha256(), 0
            for block in blocks:
                data = memoryview(np.ascontiguousarray(block, dtype=dtype).reshape(-1).view(np.uint8))
                f.write(data)
                h.update(data)
                rows += len(block)
            return h.hexdigest(), rows
        self._write_large(name, fill, dtype)

    def write_large_file_with(self, name: str, write: Callable, dtype: str) -> None:
        """As :meth:`write_large_file`, for a file written out of order or by another library: ``write`` gets
        the open staged file (binary, empty, seekable) and fills it; the file is then hashed by reading it back."""
        def fill(f) -> tuple[str, int]:
            write(f)
            f.flush()
            return sha256_file(Path(f.name)), os.fstat(f.fileno()).st_size // np.dtype(dtype).itemsize
        self._write_large(name, fill, dtype)

    def _write_large(self, name: str, fill: Callable, dtype: str) -> None:
        with self._staged(name) as tmp, open(tmp, "r+b") as f:
            digest, rows = fill(f)
            f.flush()
            os.fsync(f.fileno())
        self.meta.setdefault("large_files", {})[name] = {"sha256": digest, "rows": rows, "dtype": dtype}

    @property
    def committed_documents(self) -> int:
        return int(sum(c.get("documents", 0) for c in self.meta["chunks"]))

    def commit(self, chunk: dict | None = None, extra: dict | None = None) -> None:
        """Make everything appended since the last commit durable, then publish it: fsync the columns, then
        replace ``meta.json`` atomically. ``chunk`` (e.g. its documents and tokens) is recorded with the
        chunk's per-column sha256; ``extra`` updates the manifest's free-form ``extra`` fields."""
        try:
            for name, f in getattr(self, "_files", {}).items():
                if self._pending.get(name):
                    f.flush()
                    os.fsync(f.fileno())
            meta = dict(self.meta)
            meta["columns"] = {name: self.rows(name) for name in self.columns}
            if chunk is not None or self._pending:
                record = dict(chunk or {})
                record["rows"] = {name: n for name, n in self._pending.items() if n}
                record["sha256"] = {name: h.hexdigest() for name, h in self._pending_sums.items()}
                meta["chunks"] = [*self.meta["chunks"], record]
            if extra:
                meta["extra"] = {**self.meta.get("extra", {}), **extra}
            self._publish(meta)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(errno.ENOSPC, _disk_full_message(self.path, META, self.committed_documents)) \
                    from None
            raise
        self.meta = meta
        self._pending, self._pending_sums = {}, {}

    def _publish(self, meta: dict) -> None:
        meta["written_by"] = WRITER
        meta.pop("meta_sha256", None)
        meta["meta_sha256"] = meta_checksum(meta)
        tmp = partial_name(self.path, META)
        try:
            tmp.write_text(json.dumps(meta, separators=(",", ":")), encoding="utf-8")
            fsync_path(tmp)
            os.replace(tmp, self.path / META)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(self.path, directory=True)

    def finish(self, fields: dict, drop: tuple[str, ...] = ()) -> dict:
        """Commit what is pending, then publish the index as complete with ``fields`` (documents, tokens,
        ...) and without the columns in ``drop`` (build-time scratch; their files are removed after the
        publish, since the complete manifest no longer owns them)."""
        if self._pending:
            self.commit()
        self.close()
        meta = dict(self.meta)
        meta.update(fields)
        meta["state"] = "complete"
        meta["columns"] = {k: v for k, v in meta["columns"].items() if k not in drop}
        meta["column_types"] = {k: v for k, v in self._types().items() if k in meta["columns"]}
        for c in meta["chunks"]:
            c["rows"] = {k: v for k, v in c["rows"].items() if k not in drop}
            c["sha256"] = {k: v for k, v in c["sha256"].items() if k not in drop}
        self._publish(meta)
        self.meta = meta
        for name in drop:
            (self.path / name).unlink(missing_ok=True)
        return meta

    def close(self) -> None:
        for f in getattr(self, "_files", {}).values():
            f.close()
        self._files = {}

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a column as read from its file (flushing first): a copy, so a streaming pass
        over a column holds one block, not the mapped file, in resident memory."""
        dt, width = self.columns[name]
        if name in self._files:
            self._files[name].flush()
        with open(self.path / name, "rb") as f:
            f.seek(start * dt.itemsize * width)
            arr = np.fromfile(f, dtype=dt, count=(stop - start) * width)
        return arr.reshape(-1, width) if width != 1 else arr


def check_header(path: Path, old: dict, new: dict, label: str = "path") -> None:
    """Refuse to resume the partial build in ``path``, made with options ``old``, with other options ``new``,
    naming the first that differs."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ValueError(f"{label} {path}: holds a partial build made with {key}={old.get(key)!r}; this run "
                             f"asks for {key}={new.get(key)!r}. Re-run with the same options to resume it, or pick "
                             "another directory")


def remove_stale_partials(path: Path) -> None:
    """Remove the staging files (``.<name>.partial-<pid>-<hex>``, as this module and storage name them) that a
    killed process left: only ours by name, and only those of processes no longer running."""
    for entry in path.iterdir():
        m = PARTIAL_NAME.fullmatch(entry.name)
        if m and entry.is_file() and not _alive(int(m.group(1))):
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- building beside a complete index ----------------------------------------------------------------------
def manifest_state(path: Path) -> str | None:
    """The ``state`` of the manifest in ``path`` (``"building"``, ``"complete"``), None when there is none."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("state") if isinstance(meta, dict) else None


def large_file_names(path: Path) -> set[str]:
    """The large files (:meth:`ColumnWriter.write_large_file`) that the manifest in ``path`` lists. A manifest
    owns them as it owns its columns; ``check_index_dir`` counts only the columns and the small files, so the
    build helpers below add these (for a manifest that ``check_index_dir`` trusts: it refuses any other)."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    large = meta.get("large_files") if isinstance(meta, dict) else None
    if not isinstance(large, dict):
        return set()
    return {name for name in large if isinstance(name, str) and name not in ("", ".", "..", META)
            and Path(name).name == name and "\\" not in name}


def build_directory(out: Path, names, label: str = "path") -> Path:
    """Where a streamed build into ``out`` writes: ``out`` itself, unless ``out`` holds a complete index; then
    the staging directory inside it (:data:`~fastrank.index.storage.STAGING_DIR`), moved over the old index
    by :func:`publish_staged` once the new one is complete, so that the old one stays searchable meanwhile.
    ``names`` are the files the build writes: ``out`` must not hold such a file that no manifest owns."""
    staging = out / STAGING_DIR
    large = large_file_names(out)
    owned = check_index_dir(out, [n for n in names if n not in large], label=label)
    if (staging / META).is_file():
        return staging
    if owned and (out / META).is_file() and manifest_state(out) != "building":
        return staging
    return out


def publish_staged(staging: Path, out: Path, label: str = "path") -> Path:
    """Move a complete staged build over the index in ``out``: its files first, meta.json last (atomic renames
    on one filesystem; a reader never takes a mix of the two for an index, since the old manifest's checksums
    refuse any replaced file), then the old index's files that the new one does not have."""
    old = check_index_dir(out, label=label) | large_file_names(out)
    new = {name for name in os.listdir(staging) if name != META}
    for name in sorted(new):
        os.replace(staging / name, out / name)
    os.replace(staging / META, out / META)
    fsync_path(out, directory=True)
    for name in sorted(old - new - {META}):
        if (out / name).is_file():
            (out / name).unlink()
    staging.rmdir()
    return out


class StreamedBuild:
    """What the streamed writers (token_stream.TokenIndexWriter, dense_stream.DenseIndexWriter) share: the
    committed count a resumed run skips, the context manager, closing, and discarding a build given up on.
    A writer sets ``_columns`` (its ColumnWriter or None), ``_bar``, ``path`` (where it builds), ``out`` (where
    the index goes), ``label`` and ``_made_dir``."""

    _finished = False  # a resumed run found the build complete: nothing is left to add
    _columns: "ColumnWriter | None" = None
    _bar = None

    @property
    def committed_documents(self) -> int:
        """Documents of the stream stored by earlier runs (a resumed build skips that many)."""
        if self._finished:
            return sys.maxsize
        return self._columns.committed_documents if self._columns is not None else 0

    _given = 0  # documents handed to add() by this run, skipped ones included
    _skip = 0  # documents a resumed build stored that add() is still to skip

    def take_ids(self, ids, n: int, what: str) -> tuple[list, int] | None:
        """The ids of a chunk of ``n`` documents (default: positions continuing from those given before) with
        the leading ones a resumed build already stored dropped: ``(ids, dropped)``, or None when it stored
        the whole chunk. Also counts the chunk as given."""
        if ids is None:
            ids = list(range(self._given, self._given + n))
        else:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries for {n} {what}")
        self._given += n
        drop = min(self._skip, n)
        self._skip -= drop
        return None if drop == n else (ids[drop:], drop)

    def partial_meta(self) -> dict | None:
        """The manifest of a build in progress in ``path`` that this run resumes, else None (no manifest, an
        unreadable one that ColumnWriter refuses by name when the first chunk is written, or another state).
        A build found complete in its staging directory (a run stopped while moving it into place) is
        published first and marks this run finished."""
        meta_file = self.path / META
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        if meta.get("state") == "complete" and self.path != self.out:
            self.path = publish_staged(self.path, self.out, self.label)
            self._finished = True
            return None
        return meta if meta.get("state") == "building" else None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def discard(self) -> None:
        """Give up a build this run started on bad input: close it and remove what it wrote (a resumed build's
        earlier commits too, since the run that resumes them is being abandoned as well; see
        :func:`discard_build`). The CLI calls it on a malformed or repeated document when it started the
        build itself."""
        self.close()
        discard_build(self.path, self._made_dir)

    def close(self) -> None:
        if self._columns is not None:
            self._columns.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def discard_build(path: Path, remove_dir: bool) -> None:
    """Remove a build in progress in ``path`` that a run started and gave up on (bad input, not a crash): the
    files its manifest owns, staging files, and ``path`` itself when ``remove_dir`` (the run made it) and it is
    then empty. A complete index, or a directory without a build manifest, is left as it is."""
    meta_file = path / META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict) or meta.get("state") != "building" or meta.get("written_by") != WRITER:
        return
    for name in [*meta.get("columns", {}), *meta.get("sha256", {}), *meta.get("large_files", {})]:
        if isinstance(name, str) and "/" not in name and (path / name).is_file():
            (path / name).unlink()
    remove_stale_partials(path)
    meta_file.unlink()
    if remove_dir:
        try:
            path.rmdir()
        except OSError:
            pass  # something else is there: it stays


# -- reading a complete index ----------------------------------------------------------------------------
def map_columns(path: Path, meta: dict, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """The committed rows of every column of a complete index: read-only memory maps (a search then reads
    only the pages it touches) or, with ``mmap=False``, arrays read into RAM. Each file must hold exactly its
    committed bytes; its contents are checked by :func:`verify`, not here."""
    types = meta.get("column_types")
    if not isinstance(types, dict) or set(types) != set(meta.get("columns", {})):
        raise IndexFormatError(f"{path / META}: column_types does not describe the columns")
    out = {}
    for name, rows in meta["columns"].items():
        try:
            dt, width = np.dtype(types[name][0]), int(types[name][1])
        except (TypeError, ValueError, IndexError):
            raise IndexFormatError(f"{path / META}: column_types[{name!r}] is not a (dtype, width) pair") from None
        f = path / name
        expected = int(rows) * dt.itemsize * width
        shape = (int(rows), width) if width != 1 else (int(rows),)
        out[name] = _map(f, dt, shape, expected, mmap)
    for name, info in meta.get("large_files", {}).items():
        try:
            dt, rows = np.dtype(info["dtype"]), int(info["rows"])
        except (TypeError, ValueError, KeyError):
            raise IndexFormatError(f"{path / META}: large_files[{name!r}] is not a (dtype, rows) record") from None
        out[name] = _map(path / name, dt, (rows,), rows * dt.itemsize, mmap)
    return out


def _map(f: Path, dt: np.dtype, shape: tuple, expected: int, mmap: bool) -> np.ndarray:
    if not f.is_file():
        raise IndexFormatError(f"{f.parent}: missing {f.name}")
    if f.stat().st_size != expected:
        raise IndexFormatError(f"{f}: {f.stat().st_size} bytes, meta.json commits {expected}; the file is truncated "
                               "or from another index")
    if shape[0] == 0:
        return np.zeros(shape, dtype=dt)
    if mmap:
        return np.memmap(f, dtype=dt, mode="r", shape=shape)
    return np.fromfile(f, dtype=dt).reshape(shape)


def as_tensor(array: np.ndarray):
    """A torch view of a (possibly read-only, memory-mapped) array without copying it. Torch warns that it
    cannot enforce read-only-ness; fastrank never writes into an index's arrays."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def verify(path: Path, meta: dict, progress: bool = False) -> None:
    """Re-read every committed byte and compare each chunk's bytes per column with its recorded sha256 (and
    the small files with theirs): the full check behind ``fastrank index --verify`` and
    ``load(..., verify=True)``, which reads the whole index once."""
    from fastrank.progress import progress_bar

    types = meta["column_types"]
    handles = {name: open(path / name, "rb") for name in meta["columns"]}
    try:
        bar = progress_bar(meta["chunks"], desc=f"verifying {path.name}", unit="chunk", enabled=progress)
        for i, chunk in enumerate(bar):
            for name, rows in chunk.get("rows", {}).items():
                if name not in handles:
                    continue
                nbytes = int(rows) * np.dtype(types[name][0]).itemsize * int(types[name][1])
                h = hashlib.sha256()
                left = nbytes
                while left:
                    block = handles[name].read(min(left, _READ_BLOCK))
                    if not block:
                        break
                    h.update(block)
                    left -= len(block)
                if left or h.hexdigest() != chunk["sha256"].get(name):
                    raise IndexFormatError(f"{path / name}: the bytes of chunk {i} do not match their sha256 in "
                                           "meta.json (file corrupt or from another index)")
    finally:
        for f in handles.values():
            f.close()
    for name, info in meta.get("large_files", {}).items():
        if sha256_file(path / name) != info.get("sha256"):
            raise IndexFormatError(f"{path / name}: checksum does not match meta.json (file corrupt or from another "
                                   "index)")
    for name, expected in meta.get("sha256", {}).items():
        f = path / name
        if not f.is_file():
            raise IndexFormatError(f"{path}: missing {name}")
        if sha256_file(f) != expected:
            raise IndexFormatError(f"{f}: checksum does not match meta.json (file corrupt or from another index)")
