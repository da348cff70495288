"""Readers and writers for the IR formats fastrank consumes and produces.

Every reader takes a path (``.gz`` is decompressed transparently) and returns plain dicts keyed by string
ids, the shape ir-measures and pytrec_eval take directly:

- qrels: ``{qid: {docid: grade}}`` from TREC qrels (``qid 0 docid grade``) or BEIR ``qrels/*.tsv``
  (header ``query-id corpus-id score``);
- run: ``{qid: {docid: score}}`` from a TREC run (``qid Q0 docid rank score tag``) or a candidate TSV
  (header ``qid pid rank score``);
- queries: ``{qid: text}`` from a ``qid<TAB>text`` TSV or BEIR ``queries.jsonl``;
- corpus: ``{docid: text}`` from BEIR ``corpus.jsonl`` / passage jsonl (``{"_id", "title"?, "text"}``),
  with the title prepended as BEIR's dense baselines do.

Files are UTF-8; a byte-order mark is dropped, never made part of the first id. A malformed line is an error
naming the file and line, never a silently dropped judgment: so is a byte that is not UTF-8, and a relevance
grade that is not an integer trec_eval's C int holds (a fraction is never truncated). So is an id
given twice with different content (a query's text, a document's text, a judgment's grade, a run's
score): a dict would keep one and drop the other without a word. A line that repeats an earlier one
exactly loses nothing; it is kept once, and one warning per file counts them.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

PathLike = str | os.PathLike

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

# The embedded TREC DL 2019 re-rank set (43 judged queries, official qrels, BM25 top-100 with passages).
EMBEDDED_DL19 = Path(__file__).resolve().parent / "data" / "dl19"


class DataFormatError(ValueError):
    """A file does not have the layout its reader expects; the message names the file and line."""


# utf-8-sig: a byte-order mark (Windows editors and Excel write one) would otherwise become part of the first
# id, and that query or document would silently match nothing.
ENCODING = "utf-8-sig"

# Grades are handed to trec_eval (pytrec_eval) as C ints; negative grades are legal TREC qrels (junk, -1/-2).
GRADE_MIN, GRADE_MAX = -2**31, 2**31 - 1


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _open_text(path: PathLike) -> io.TextIOBase:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return io.TextIOWrapper(_open_binary(path), encoding=ENCODING)


def numbered_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line of a text file (gzip read transparently), line ends stripped:
    every reader here and in fastrank.train names a bad line by the number this gives."""
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError as exc:
            raise _undecodable(Path(path), exc) from None


def _undecodable(path: Path, exc: UnicodeDecodeError) -> DataFormatError:
    """The decoder reports a position within its read-ahead buffer, not the file: the file is scanned again
    line by line to name the line (and column) that is not UTF-8."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")  # a BOM is valid UTF-8, and columns stay byte columns of the file
            except UnicodeDecodeError as bad:
                return DataFormatError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[bad.start]:02x} at column "
                                       f"{bad.start + 1}); save the file as UTF-8")
    return DataFormatError(f"{path}: not valid UTF-8 ({exc.reason})")


def _is_header(fields: list[str], numeric_col: int) -> bool:
    try:
        float(fields[numeric_col])
    except (ValueError, IndexError):
        return True
    return False


def _rows(path: PathLike, short: int, long: int, expected: str) -> Iterator[tuple[int, list[str]]]:
    """Whitespace-separated rows of ``short`` or ``long`` fields. The first data row fixes the width for the
    whole file, so a truncated line cannot pass as the other format; a header of ``short`` fields (its last
    field not a number) is skipped."""
    width = None
    for lineno, line in numbered_lines(path):
        fields = line.split()
        if width is None and len(fields) == short and _is_header(fields, short - 1):
            continue
        if width is None and len(fields) in (short, long):
            width = len(fields)
        if len(fields) != width:
            raise DataFormatError(f"{path}:{lineno}: expected {expected} like the first line, got {len(fields)} fields: {line!r}")
        yield lineno, fields


class _Unique:
    """Collects ``key -> value`` from a file, refusing a key given again with another value and counting
    exact repeats (reported by :meth:`done` in one warning)."""

    def __init__(self, path: PathLike, what: str, field: str):
        self.path, self.what, self.field = path, what, field
        self.first: dict = {}
        self.repeats = 0

    def add(self, target: dict, key: str, value, lineno: int, qid: str | None = None) -> None:
        """``target[key] = value`` (``target`` being query ``qid``'s dict in qrels and runs)."""
        if key in target:
            if target[key] != value:
                shown = key if qid is None else f"{qid} {key}"
                raise DataFormatError(f"{self.path}:{lineno}: duplicate {self.what} {shown!r} (first at line "
                                      f"{self.first[qid, key]}) with a different {self.field}: {target[key]!r} then "
                                      f"{value!r}")
            self.repeats += 1
            return
        self.first[qid, key] = lineno
        target[key] = value

    def done(self) -> None:
        if self.repeats:
            warnings.warn(f"{self.path}: {self.repeats} repeated {self.what} line(s) with the same {self.field} "
                          "as an earlier line; each is kept once", UserWarning, stacklevel=3)


def read_qrels(path: PathLike) -> Qrels:
    """TREC qrels (``qid iter docid grade``, whitespace separated) or BEIR qrels TSV with a header."""
    qrels: Qrels = {}
    unique = _Unique(path, "judgment", "grade")
    for lineno, fields in _rows(path, 3, 4, "'qid iter docid grade' (TREC) or 'qid docid grade' (BEIR)"):
        if len(fields) == 3:
            qid, docid, grade = fields
        else:
            qid, _, docid, grade = fields
        unique.add(qrels.setdefault(qid, {}), docid, _grade(grade, f"{path}:{lineno}"), lineno, qid)
    unique.done()
    if not qrels:
        raise DataFormatError(f"{path}: no judgments found")
    return qrels


def _grade(text: str, where: str) -> int:
    """A relevance grade: an integer (``2``, ``-1``, or ``2.0``) that fits trec_eval's C int. A fraction is
    refused rather than truncated, which would silently change the judgment."""
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise DataFormatError(f"{where}: relevance grade {text!r} is not a number") from None
        if not number.is_integer():
            raise DataFormatError(f"{where}: relevance grade {text!r} is not an integer") from None
        value = int(number)
    if not GRADE_MIN <= value <= GRADE_MAX:
        raise DataFormatError(f"{where}: relevance grade {text!r} is out of range (expected an integer from "
                              f"{GRADE_MIN} to {GRADE_MAX})")
    return value


def read_run(path: PathLike) -> Run:
    """A TREC run (``qid Q0 docid rank score tag``) or a candidate TSV with header ``qid pid rank score``.

    Scores are kept as given; trec_eval (and so ir-measures) ranks by score, not by the rank column.
    """
    run: Run = {}
    unique = _Unique(path, "ranked document", "score")
    expected = "a TREC run line 'qid Q0 docid rank score tag' or a candidate line 'qid pid rank score'"
    for lineno, fields in _rows(path, 4, 6, expected):
        if len(fields) == 6:
            qid, _, docid, _, score, _ = fields
        else:
            qid, docid, _, score = fields
        try:
            value = float(score)
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: score {score!r} is not a number") from None
        unique.add(run.setdefault(qid, {}), docid, value, lineno, qid)
    unique.done()
    if not run:
        raise DataFormatError(f"{path}: no ranked documents found")
    return run


read_candidates = read_run


def write_run(run: Mapping[str, Mapping[str, float]], path: PathLike, tag: str = "fastrank",
              depth: int | None = None) -> None:
    """Write a TREC run, each query's documents by descending score (ties by docid, descending, as
    trec_eval breaks them), keeping the top ``depth`` per query when given."""
    check_tag(tag)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as raw:
        # GzipFile records `path`'s name in the header, not the temporary file's.
        binary = gzip.GzipFile(path.name, "wb", fileobj=raw) if path.suffix == ".gz" else raw
        with binary, io.TextIOWrapper(binary, encoding="utf-8") as f:
            for qid in sorted(run, key=_natural_key):
                ranked = sorted(run[qid].items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
                for rank, (docid, score) in enumerate(ranked[:depth] if depth else ranked, 1):
                    f.write(f"{qid} Q0 {docid} {rank} {float(score):.6f} {tag}\n")


class atomic_output:
    """``with atomic_output(path) as tmp:`` write the new file ``tmp`` beside ``path``; on success it replaces
    ``path`` in one rename, on failure it is removed and ``path`` keeps what it held. A reader never sees half
    a file, and a failed command leaves no partial output behind. Files only: replacing a directory would
    mean deleting whatever else a user keeps in it (index directories have their own manifest-guided save,
    :mod:`fastrank.index.storage`)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory; expected the path of a file to write")
        # Created here rather than by tempfile, whose files are private (0600): the output gets the
        # permissions any new file would.
        for _ in range(100):
            self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                self.tmp.open("x").close()
                return self.tmp
            except FileExistsError:
                continue
        raise FileExistsError(f"{self.path}: cannot create a temporary file beside it")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)


def check_tag(tag: str, name: str = "tag") -> None:
    """A run's tag is its sixth column: one non-empty word."""
    if not isinstance(tag, str) or not tag or any(c.isspace() for c in tag):
        raise ValueError(f"{name} must be one non-empty word, got {tag!r}")


def _natural_key(qid: str):
    return (0, int(qid), "") if qid.isdigit() else (1, 0, qid)


def read_queries(path: PathLike) -> dict[str, str]:
    """``qid<TAB>text`` TSV, or BEIR ``queries.jsonl`` (``{"_id", "text"}``)."""
    path = Path(path)
    queries: dict[str, str] = {}
    unique = _Unique(path, "query id", "text")
    if ".jsonl" in path.suffixes:
        for lineno, qid, rec in _jsonl_records(path, need_text=True):
            unique.add(queries, qid, rec["text"], lineno)
    else:
        for lineno, line in numbered_lines(path):
            qid, sep, text = line.partition("\t")
            if not sep:
                raise DataFormatError(f"{path}:{lineno}: expected 'qid<TAB>query text', got {line!r}")
            unique.add(queries, qid, text, lineno)
    unique.done()
    if not queries:
        raise DataFormatError(f"{path}: no queries found")
    return queries


def _jsonl_records(path: PathLike, need_text: bool) -> Iterator[tuple[int, str, dict]]:
    """``(lineno, id, record)`` per line; ``_id`` a non-empty string or an integer, ``text`` and ``title``
    strings (a missing or null title is no title)."""
    for lineno, line in numbered_lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or "_id" not in rec or (need_text and "text" not in rec):
            raise DataFormatError(f'{path}:{lineno}: expected an object with "_id" and "text"')
        docid = rec["_id"]
        if isinstance(docid, bool) or not isinstance(docid, (str, int)) or docid == "":
            raise DataFormatError(f'{path}:{lineno}: "_id" must be a non-empty string or an integer, got {docid!r}')
        for field in ("text", "title"):
            value = rec.get(field)
            if (field in rec or need_text and field == "text") and not isinstance(value, str) \
                    and not (field == "title" and value is None):
                raise DataFormatError(f'{path}:{lineno}: "{field}" must be a string, got '
                                      f'{"null" if value is None else type(value).__name__}')
        yield lineno, str(docid), rec


def read_corpus(path: PathLike) -> dict[str, str]:
    """BEIR ``corpus.jsonl`` or a passage jsonl: ``{docid: "title text"}`` (title omitted when empty)."""
    corpus: dict[str, str] = {}
    unique = _Unique(path, "document id", "text")
    for lineno, docid, rec in _jsonl_records(path, need_text=True):
        title = (rec.get("title") or "").strip()
        unique.add(corpus, docid, f"{title} {rec['text']}" if title else rec["text"], lineno)
    unique.done()
    if not corpus:
        raise DataFormatError(f"{path}: no documents found")
    return corpus


def _tsv_records(path: PathLike) -> Iterator[tuple[int, str, str]]:
    """``(lineno, id, text)`` of a TREC collection tsv (``id<TAB>text``, MS MARCO's collection.tsv) or
    ``id<TAB>title<TAB>text``."""
    for lineno, line in numbered_lines(path):
        fields = line.split("\t")
        if len(fields) not in (2, 3) or not fields[0].strip():
            raise DataFormatError(f"{path}:{lineno}: expected id<TAB>text (or id<TAB>title<TAB>text), got "
                                  f"{len(fields)} tab-separated fields")
        text = fields[-1] if len(fields) == 2 or not fields[1].strip() else f"{fields[1].strip()} {fields[2]}"
        yield lineno, fields[0].strip(), text


def corpus_records(path: PathLike) -> Iterator[tuple[int, str, str]]:
    """``(lineno, id, text)`` for each document of a corpus, read a line at a time (never whole): BEIR
    ``corpus.jsonl`` or a passage jsonl (``{_id, title?, text}``, title prepended when present), or a TREC
    collection ``.tsv`` (``id<TAB>text``); gzip read transparently."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if ".tsv" in suffixes:
        yield from _tsv_records(path)
        return
    for lineno, docid, rec in _jsonl_records(path, need_text=True):
        title = (rec.get("title") or "").strip()
        yield lineno, docid, f"{title} {rec['text']}" if title else rec["text"]


def corpus_chunks(path: PathLike, chunk_docs: int) -> Iterator[list[tuple[int, str, str]]]:
    """:func:`corpus_records` in lists of ``chunk_docs`` (the last may be shorter): what a streamed index
    build encodes and commits at a time. An empty corpus is an error naming the file."""
    chunk: list[tuple[int, str, str]] = []
    empty = True
    for record in corpus_records(path):
        chunk.append(record)
        empty = False
        if len(chunk) == chunk_docs:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
    if empty:
        raise DataFormatError(f"{path}: no documents found")


def count_lines(path: PathLike) -> int:
    """Lines of a (possibly gzipped) file, counted on bytes at disk speed: an upper bound on its documents,
    for a progress bar's ETA."""
    n, last = 0, b"\n"
    with _open_binary(Path(path)) as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            n += block.count(b"\n")
            last = block
    return n + (0 if last.endswith(b"\n") else 1)


@dataclass
class RetrievalSet:
    """A full-retrieval benchmark: judged queries over a corpus (BEIR layout)."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels


@dataclass
class RerankSet:
    """A re-ranking benchmark: judged queries, first-stage candidates and the candidates' texts."""

    queries: dict[str, str]
    qrels: Qrels
    candidates: Run
    passages: dict[str, str]


def load_beir(folder: PathLike, split: str = "test") -> RetrievalSet:
    """A BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``); queries are restricted
    to those judged in ``split``."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"{folder} is not a BEIR folder: missing {p.relative_to(folder)}")
    qrels = read_qrels(qrels_path)
    queries = read_queries(folder / "queries.jsonl")
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise DataFormatError(f"{qrels_path}: {len(missing)} judged queries not in queries.jsonl, e.g. {missing[:3]}")
    return RetrievalSet(read_corpus(folder / "corpus.jsonl"), {q: queries[q] for q in qrels}, qrels)


def _one(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    hits = sorted({p for pat in patterns for p in folder.glob(pat)})
    if len(hits) != 1:
        raise FileNotFoundError(
            f"{folder}: expected exactly one {what} file matching {' or '.join(patterns)}, found {len(hits)}"
        )
    return hits[0]


def load_trec_dl(folder: PathLike | None = None) -> RerankSet:
    """A TREC DL re-rank folder (``queries*.tsv``, ``*qrels*``, ``*.candidates.tsv``,
    ``*.passages.jsonl``, each optionally gzipped). With no folder, the DL 2019 set embedded in fastrank."""
    folder = Path(folder) if folder is not None else EMBEDDED_DL19
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    queries = read_queries(_one(folder, ("queries*.tsv", "queries*.tsv.gz"), "queries"))
    qrels = read_qrels(_one(folder, ("*qrels*.txt", "*qrels*.txt.gz"), "qrels"))
    candidates = read_run(_one(folder, ("*candidates.tsv", "*candidates.tsv.gz"), "candidates"))
    passages = read_corpus(_one(folder, ("*passages.jsonl", "*passages.jsonl.gz"), "passages"))
    queries = {q: t for q, t in queries.items() if q in qrels}
    if not queries:
        raise DataFormatError(f"{folder}: no query has judgments")
    unknown = {d for q in queries for d in candidates.get(q, {}) if d not in passages}
    if unknown:
        raise DataFormatError(f"{folder}: {len(unknown)} candidate passages have no text, e.g. {sorted(unknown)[:3]}")
    return RerankSet(queries, qrels, {q: candidates.get(q, {}) for q in queries}, passages)
