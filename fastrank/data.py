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

A malformed line is an error naming the file and line, never a silently dropped judgment.
"""
from __future__ import annotations

import gzip
import io
import json
import os
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


def _open_text(path: PathLike) -> io.TextIOBase:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: PathLike) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if line.strip():
                yield lineno, line


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
    for lineno, line in _lines(path):
        fields = line.split()
        if width is None and len(fields) == short and _is_header(fields, short - 1):
            continue
        if width is None and len(fields) in (short, long):
            width = len(fields)
        if len(fields) != width:
            raise DataFormatError(f"{path}:{lineno}: expected {expected} like the first line, got {len(fields)} fields: {line!r}")
        yield lineno, fields


def read_qrels(path: PathLike) -> Qrels:
    """TREC qrels (``qid iter docid grade``, whitespace separated) or BEIR qrels TSV with a header."""
    qrels: Qrels = {}
    for lineno, fields in _rows(path, 3, 4, "'qid iter docid grade' (TREC) or 'qid docid grade' (BEIR)"):
        if len(fields) == 3:
            qid, docid, grade = fields
        else:
            qid, _, docid, grade = fields
        try:
            qrels.setdefault(qid, {})[docid] = int(float(grade))
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: relevance grade {grade!r} is not a number") from None
    if not qrels:
        raise DataFormatError(f"{path}: no judgments found")
    return qrels


def read_run(path: PathLike) -> Run:
    """A TREC run (``qid Q0 docid rank score tag``) or a candidate TSV with header ``qid pid rank score``.

    Scores are kept as given; trec_eval (and so ir-measures) ranks by score, not by the rank column.
    """
    run: Run = {}
    for lineno, fields in _rows(path, 4, 6, "a TREC run line 'qid Q0 docid rank score tag' or a candidate line 'qid pid rank score'"):
        if len(fields) == 6:
            qid, _, docid, _, score, _ = fields
        else:
            qid, docid, _, score = fields
        try:
            run.setdefault(qid, {})[docid] = float(score)
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: score {score!r} is not a number") from None
    if not run:
        raise DataFormatError(f"{path}: no ranked documents found")
    return run


read_candidates = read_run


def write_run(run: Mapping[str, Mapping[str, float]], path: PathLike, tag: str = "fastrank",
              depth: int | None = None) -> None:
    """Write a TREC run, each query's documents by descending score (ties by docid, descending, as
    trec_eval breaks them), keeping the top ``depth`` per query when given."""
    if any(c.isspace() for c in tag) or not tag:
        raise ValueError(f"tag must be one non-empty word, got {tag!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else open(path, "w", encoding="utf-8")
    with opener as f:
        for qid in sorted(run, key=_natural_key):
            ranked = sorted(run[qid].items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
            for rank, (docid, score) in enumerate(ranked[:depth] if depth else ranked, 1):
                f.write(f"{qid} Q0 {docid} {rank} {float(score):.6f} {tag}\n")


def _natural_key(qid: str):
    return (0, int(qid), "") if qid.isdigit() else (1, 0, qid)


def read_queries(path: PathLike) -> dict[str, str]:
    """``qid<TAB>text`` TSV, or BEIR ``queries.jsonl`` (``{"_id", "text"}``)."""
    path = Path(path)
    if ".jsonl" in path.suffixes:
        return {docid: rec["text"] for docid, rec in _jsonl_records(path, need_text=True)}
    queries: dict[str, str] = {}
    for lineno, line in _lines(path):
        qid, sep, text = line.partition("\t")
        if not sep:
            raise DataFormatError(f"{path}:{lineno}: expected 'qid<TAB>query text', got {line!r}")
        queries[qid] = text
    if not queries:
        raise DataFormatError(f"{path}: no queries found")
    return queries


def _jsonl_records(path: PathLike, need_text: bool) -> Iterator[tuple[str, dict]]:
    for lineno, line in _lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or "_id" not in rec or (need_text and "text" not in rec):
            raise DataFormatError(f'{path}:{lineno}: expected an object with "_id" and "text"')
        yield str(rec["_id"]), rec


def read_corpus(path: PathLike) -> dict[str, str]:
    """BEIR ``corpus.jsonl`` or a passage jsonl: ``{docid: "title text"}`` (title omitted when empty)."""
    corpus = {}
    for docid, rec in _jsonl_records(path, need_text=True):
        title = (rec.get("title") or "").strip()
        corpus[docid] = f"{title} {rec['text']}" if title else rec["text"]
    if not corpus:
        raise DataFormatError(f"{path}: no documents found")
    return corpus


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
