"""Re-ranking a run of any size in bounded memory, and resuming it after a crash.

``fastrank rerank`` used to encode every candidate passage of the run up front and, for LITE, pad every
query's candidate list at once: memory grew with the whole run (SciFact's 300 x 100 candidates peaked at
11.5 GB; MS MARCO dev's top-1000 would need hundreds). Here the queries are cut, in the run's order, into
chunks whose candidates name at most ``chunk_size`` distinct passages; each chunk's queries and passages are
encoded, scored and let go before the next, so what stays resident is one chunk's tokens and the scores.

Each finished chunk is appended to a journal beside the output (``<out>.rerank-journal``) and synced, so a
run killed after hours restarts where it stopped when the same command is given again: the journal's header
holds a fingerprint of everything the scores depend on (inputs, model, scorer, dtype, depth, chunk size), and
a journal of another command is refused rather than reused. Chunks are cut the same way every time, so a
resumed run scores its remaining chunks exactly as an uninterrupted one would. The journal is removed once the
output is written; a file at that path that is not a fastrank journal is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

JOURNAL_SUFFIX = ".rerank-journal"
_MAGIC = "fastrank-rerank-journal"
_VERSION = 1


def chunk_queries(qids: Sequence[str], candidates: Mapping[str, Mapping[str, float]], chunk_size: int) -> list[list[str]]:
    """``qids`` in order, cut into runs of consecutive queries whose candidates name at most ``chunk_size``
    distinct passages (a query with more candidates than that is a chunk of its own). A run whose passages
    all fit is one chunk: every passage is encoded once, as before chunking existed."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunks: list[list[str]] = []
    current: list[str] = []
    held: set[str] = set()
    for q in qids:
        new = set(candidates[q]) - held
        if current and len(held) + len(new) > chunk_size:
            chunks.append(current)
            current, held, new = [], set(), set(candidates[q])
        current.append(q)
        held |= new
    if current:
        chunks.append(current)
    return chunks


def file_identity(path: str | os.PathLike | None) -> list | None:
    """What the journal's fingerprint records of an input file or directory: resolved path, size and
    modification time (of every file in a directory), enough to notice an input changed between runs."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return [str(p.resolve())] + sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                           for f in p.rglob("*") if f.is_file())
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


class JournalError(ValueError):
    pass


class Journal:
    """The finished chunks of one re-ranking command, one JSON line per chunk after a header line."""

    def __init__(self, out: str | os.PathLike, settings: Mapping):
        self.path = Path(str(out) + JOURNAL_SUFFIX)
        self.fingerprint = fingerprint(settings)
        self._done: list[dict[str, dict[str, float]]] = []  # per finished chunk read back: qid -> {pid: score}
        self._good_bytes = 0
        self._opened = False
        self.finished = 0  # chunks an earlier run finished, as open() found them

    def open(self) -> int:
        """Read what an earlier run of the same command finished (a torn last line, from a crash mid-write,
        is dropped) and prepare to append; returns the number of finished chunks. Opening again is a no-op.
        A journal of another command that finished no chunk holds nothing to keep and is started afresh."""
        if self._opened:
            return self.finished
        if self.path.exists() and self._read():
            with open(self.path, "r+b") as f:
                f.truncate(self._good_bytes)
        else:
            header = json.dumps({"format": _MAGIC, "version": _VERSION, "fingerprint": self.fingerprint}) + "\n"
            with open(self.path, "w" if self.path.exists() else "x", encoding="utf-8") as f:
                f.write(header)
                f.flush()
                os.fsync(f.fileno())
        self._opened = True
        self.finished = len(self._done)
        return self.finished

    def _read(self) -> bool:
        """Load a journal of this command (True), or find one of ours that finished nothing (False); refuse
        anything else."""
        if not self.path.is_file():
            raise JournalError(f"{self.path} exists and is not a file; move it away to re-rank into "
                               f"{self.path.name[:-len(JOURNAL_SUFFIX)]}")
        with open(self.path, "rb") as f:
            first = f.readline()
            try:
                header = json.loads(first)
                ours = isinstance(header, dict) and header.get("format") == _MAGIC
            except ValueError:
                ours = False
            if not ours or not first.endswith(b"\n"):
                raise JournalError(f"{self.path} exists and is not a fastrank rerank journal; fastrank will not "
                                   "overwrite it: move it away, or write the output elsewhere")
            same = header.get("version") == _VERSION and header.get("fingerprint") == self.fingerprint
            if not same and not f.readline().endswith(b"\n"):
                return False  # another command's journal, but not one chunk finished in it
            f.seek(len(first))
            if not same:
                raise JournalError(f"{self.path} holds an unfinished re-ranking by another command (other inputs, "
                                   "model, scorer, --token-dtype, --depth or --chunk-size); run that command again to "
                                   "finish it, or delete the journal to start this one")
            good = len(first)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn by a crash mid-write: that chunk runs again
                try:
                    chunk = json.loads(line)
                except ValueError:
                    break
                if not isinstance(chunk, dict) or not isinstance(chunk.get("scores"), dict):
                    break
                self._done.append({q: dict(pairs) for q, pairs in chunk["scores"].items()})
                good += len(line)
        self._good_bytes = good
        return True

    def append(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record one finished chunk, synced to disk before returning (on disk only: the caller's run is the
        one copy of the scores in memory)."""
        line = json.dumps({"scores": {q: list(s.items()) for q, s in scores.items()}}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def take_finished(self) -> dict[str, dict[str, float]]:
        """The scores of the chunks :meth:`open` read back, handed over once (the journal keeps no copy)."""
        scores: dict[str, dict[str, float]] = {}
        for chunk in self._done:
            scores.update(chunk)
        self._done = []
        return scores

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def rerank_in_chunks(qids: Sequence[str], candidates: Mapping[str, Mapping[str, float]],
                     score_chunk: Callable[[list[str], bool], Mapping[str, Mapping[str, float]]], *, chunk_size: int,
                     journal: Journal | None = None, progress: bool = True, on_resume: Callable[[int, int], None] | None = None
                     ) -> dict[str, dict[str, float]]:
    """Every query's candidates scored by ``score_chunk`` (given one chunk's query ids and whether to show
    its own progress, it returns their scores), chunk by chunk; with a ``journal`` the chunks an earlier run
    finished are read back, not scored. A run of one chunk shows ``score_chunk``'s progress (the encoding);
    a longer one a bar over all its candidates."""
    from fastrank.progress import progress_bar

    chunks = chunk_queries(qids, candidates, chunk_size)
    finished = journal.open() if journal is not None else 0
    if finished > len(chunks):
        raise JournalError(f"{journal.path} records {finished} chunks, more than this command has ({len(chunks)})")
    run: dict[str, dict[str, float]] = journal.take_finished() if journal is not None else {}
    if finished and on_resume is not None:
        on_resume(finished, len(chunks))
    total = sum(len(candidates[q]) for q in qids)
    single = len(chunks) == 1
    bar = progress_bar(total=total, initial=sum(len(candidates[q]) for c in chunks[:finished] for q in c),
                       desc="re-rank", unit="doc", enabled=progress and not single)
    for chunk in chunks[finished:]:
        scores = score_chunk(chunk, progress and single)
        missing = [q for q in chunk if q not in scores]
        if missing:
            raise RuntimeError(f"score_chunk returned no scores for {missing[:3]}")
        if journal is not None:
            journal.append({q: scores[q] for q in chunk})
        run.update({q: dict(scores[q]) for q in chunk})
        bar.update(sum(len(candidates[q]) for q in chunk))
    bar.close()
    return run
