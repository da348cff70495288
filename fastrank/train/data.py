"""Training data: queries with positives (qrels) and a pool of negatives each, split into training and held-out
dev queries, sampled into groups (the positive first, then K-1 negatives) reproducibly per (seed, epoch).

Negatives come from a candidates run, from a teacher file's scored pairs, or are mined as the base
encoder's dense top-N with the judged positives removed. Teacher scores, when given, come from a file
(Hofstatter TSV ``score_pos score_neg qid pid_pos pid_neg`` or jsonl ``{qid, pid, score}``) or from a local
cross-encoder scored once over every pool and cached.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrank.data import DataFormatError, numbered_lines, read_corpus, read_qrels, read_queries

TeacherScores = dict[tuple[str, str], float]


def read_teacher(path: str | Path) -> TeacherScores:
    """Teacher scores ``{(qid, pid): score}`` from a Hofstatter TSV (``score_pos score_neg qid pid_pos
    pid_neg``) or a jsonl of ``{"qid", "pid", "score"}``. A pair scored twice must agree (to 1e-4)."""
    path = Path(path)
    scores: TeacherScores = {}

    def put(qid: str, pid: str, score: float, where: str) -> None:
        old = scores.setdefault((qid, pid), score)
        if abs(old - score) > 1e-4 * max(1.0, abs(old)):
            raise DataFormatError(f"{where}: teacher score {score} for ({qid}, {pid}) differs from an earlier {old}")

    jsonl = ".jsonl" in path.suffixes
    for lineno, line in numbered_lines(path):
        where = f"{path}:{lineno}"
        try:
            if jsonl:
                rec = json.loads(line)
                parsed = [(str(rec["qid"]), str(rec["pid"]), float(rec["score"]))]
            else:
                fields = line.split("\t") if "\t" in line else line.split()
                if len(fields) != 5:
                    raise ValueError
                parsed = [(fields[2], fields[3], float(fields[0])), (fields[2], fields[4], float(fields[1]))]
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            expected = '{"qid", "pid", "score"}' if jsonl else "score_pos score_neg qid pid_pos pid_neg"
            raise DataFormatError(f"{where}: expected {expected}, got {line[:120]!r}") from None
        for qid, pid, score in parsed:
            put(qid, pid, score, where)
    if not scores:
        raise DataFormatError(f"{path}: no teacher scores found")
    return scores


def hofstatter_positives(path: str | Path) -> dict[str, set[str]]:
    """The ``pid_pos`` column of a Hofstatter TSV per query (jsonl teacher files carry no positives)."""
    if ".jsonl" in Path(path).suffixes:
        return {}
    out: dict[str, set[str]] = {}
    for _, line in numbered_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        out.setdefault(fields[2], set()).add(fields[3])
    return out


@dataclass
class TrainData:
    """Texts, positives and negative pools; ``train_qids`` and ``dev_qids`` are disjoint."""

    corpus: dict[str, str]
    queries: dict[str, str]
    positives: dict[str, list[str]]
    pools: dict[str, list[str]]
    train_qids: list[str]
    dev_qids: list[str]
    qrels: dict[str, dict[str, int]]
    teacher: TeacherScores | None = None

    def groups(self, epoch: int, seed: int, k: int) -> list[tuple[str, list[str]]]:
        """This epoch's groups, one per training query in a shuffled order: ``(qid, [positive, K-1 negatives])``.
        The same (seed, epoch) gives the same groups, which is what makes a resumed run continue exactly."""
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(self.train_qids)
        rng.shuffle(order)
        out = []
        for qid in order:
            pool = self.pools[qid]
            out.append((qid, [rng.choice(self.positives[qid])] + rng.sample(pool, min(k - 1, len(pool)))))
        return out

    def teacher_matrix(self, groups, k: int) -> torch.Tensor:
        """(B, K) teacher scores of the groups' candidates (float32)."""
        t = torch.zeros(len(groups), k)
        for i, (qid, pids) in enumerate(groups):
            t[i, :len(pids)] = torch.tensor([self.teacher[(qid, p)] for p in pids])
        return t


def load_training_queries(folder: str | Path, teacher_file: str | None) -> tuple[dict, dict, dict, dict[str, list[str]]]:
    """(corpus, queries, train qrels, positives) of a BEIR folder; positives are the qrels' grade > 0 documents
    (plus a Hofstatter teacher file's pid_pos), limited to documents in the corpus."""
    folder = Path(folder)
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    qrels = read_qrels(folder / "qrels" / "train.tsv")
    positives: dict[str, set[str]] = {q: {d for d, g in docs.items() if g > 0} for q, docs in qrels.items()}
    if teacher_file:
        for q, pids in hofstatter_positives(teacher_file).items():
            positives.setdefault(q, set()).update(pids)
    missing_q = [q for q in positives if q not in queries]
    if missing_q:
        raise DataFormatError(f"{folder}: {len(missing_q)} training queries have no text in queries.jsonl, "
                              f"e.g. {missing_q[:3]}")
    dropped = sum(1 for docs in positives.values() for d in docs if d not in corpus)
    if dropped:
        raise DataFormatError(f"{folder}: {dropped} judged positives are not in corpus.jsonl")
    positives_l = {q: sorted(d) for q, d in positives.items() if d}
    if not positives_l:
        raise DataFormatError(f"{folder}/qrels/train.tsv: no query has a positive (grade > 0)")
    return corpus, queries, qrels, positives_l


def split_dev(qids: list[str], n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``n_dev`` queries (at most a fifth) for periodic evaluation; never the test split."""
    n_dev = min(n_dev, len(qids) // 5)
    order = sorted(qids)
    random.Random(seed).shuffle(order)
    return sorted(order[n_dev:]), sorted(order[:n_dev])


def pools_from_run(run: dict[str, dict[str, float]], positives: dict[str, list[str]], depth: int) -> dict[str, list[str]]:
    """Each query's top-``depth`` documents of a run with its positives removed, in rank order."""
    pools = {}
    for qid, pos in positives.items():
        ranked = sorted(run.get(qid, {}).items(), key=lambda kv: kv[1], reverse=True)
        keep = set(pos)
        pools[qid] = [d for d, _ in ranked if d not in keep][:depth]
    return pools


def pools_from_teacher(teacher: TeacherScores, positives: dict[str, list[str]]) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {}
    for (qid, pid), _ in sorted(teacher.items()):
        if qid in positives and pid not in positives[qid]:
            pools.setdefault(qid, []).append(pid)
    return pools



