"""Retrieval metrics through ir-measures (its pytrec_eval provider is trec_eval itself), so fastrank's
figures match trec_eval's to the digit and no metric is re-derived here.

Measures use ir-measures notation: ``nDCG@10``, ``RR@10``, ``RR(rel=2)@10``, ``R@100``, ``AP``. TREC DL
counts a passage relevant for the binary measures at grade >= 2; pass ``rel=2`` to get those.
A query judged but absent from the run counts 0 (ir-measures' convention, trec_eval's ``-c``); a query in
the run but not judged is ignored.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100", "AP")


def _ir_measures():
    try:
        import ir_measures
    except ImportError as exc:
        raise ImportError(
            "fastrank.evaluate needs ir-measures: pip install 'fastrank[retrieval]' (or ir-measures pytrec_eval)"
        ) from exc
    return ir_measures


def default_measures(rel: int = 1) -> list[str]:
    """nDCG@10 on graded judgments, with RR@10, R@100 and AP counting grade >= ``rel`` as relevant."""
    if rel < 1:
        raise ValueError(f"rel must be >= 1, got {rel}")
    if rel == 1:
        return list(DEFAULT_MEASURES)
    return ["nDCG@10", f"RR(rel={rel})@10", f"R(rel={rel})@100", f"AP(rel={rel})"]


def _measures(measures: Sequence[str] | None, rel: int) -> list:
    if measures is not None and rel != 1:
        raise ValueError(f"rel={rel} sets the default measures' threshold only; with measures given, write it into "
                         f"the measure instead, e.g. 'RR(rel={rel})@10'")
    return parse_measures(measures if measures is not None else default_measures(rel))


def parse_measures(measures: Iterable[str]) -> list:
    ir_measures = _ir_measures()
    parsed = []
    for name in measures:
        try:
            parsed.append(ir_measures.parse_measure(name))
        except (ValueError, NameError, SyntaxError, TypeError) as exc:
            raise ValueError(f"measures: cannot parse {name!r} as an ir-measures measure ({exc})") from None
    if not parsed:
        raise ValueError("measures: at least one measure is required")
    return parsed


def _check(qrels: Mapping, run: Mapping) -> None:
    if not qrels:
        raise ValueError("qrels is empty")
    if not run:
        raise ValueError("run is empty")
    if not set(qrels) & set(run):
        raise ValueError(
            f"run and qrels share no query id (run has e.g. {sorted(run)[:3]}, qrels e.g. {sorted(qrels)[:3]})"
        )


def evaluate(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
             measures: Sequence[str] | None = None, rel: int = 1) -> dict[str, float]:
    """Mean of each measure over the judged queries (those missing from ``run`` count 0).

    Returns ``{measure name in ir-measures notation: value}`` in the order asked.
    """
    _check(qrels, run)
    parsed = _measures(measures, rel)
    agg = _ir_measures().calc_aggregate(parsed, _int_qrels(qrels), _float_run(run))
    return {str(m): float(agg[m]) for m in parsed}


def evaluate_per_query(qrels, run, measures: Sequence[str] | None = None, rel: int = 1) -> dict[str, dict[str, float]]:
    """``{qid: {measure: value}}`` for every judged query."""
    _check(qrels, run)
    parsed = _measures(measures, rel)
    out: dict[str, dict[str, float]] = {}
    for m in _ir_measures().iter_calc(parsed, _int_qrels(qrels), _float_run(run)):
        out.setdefault(m.query_id, {})[str(m.measure)] = float(m.value)
    return out


def _int_qrels(qrels):
    return {str(q): {str(d): _grade(q, d, g) for d, g in docs.items()} for q, docs in qrels.items()}


def _grade(qid, docid, grade) -> int:
    """``grade`` as the C int trec_eval reads: a fraction is refused rather than truncated, and a value out of
    range (which pytrec_eval reports as a SystemError, Python's int() of inf as an OverflowError) is refused."""
    from numbers import Integral, Real

    from fastrank.data import GRADE_MAX, GRADE_MIN

    integral = isinstance(grade, Integral) or isinstance(grade, Real) and float(grade).is_integer()
    if not integral or not GRADE_MIN <= grade <= GRADE_MAX:
        raise ValueError(f"qrels[{qid!r}][{docid!r}]: relevance grade {grade!r} is not an integer from {GRADE_MIN} "
                         f"to {GRADE_MAX}")
    return int(grade)


def _float_run(run):
    return {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A plain-text table: one row per system, one column per measure."""
    systems = list(results)
    measures = list(dict.fromkeys(m for r in results.values() for m in r))
    name_w = max([len("system")] + [len(s) for s in systems])
    widths = [max(len(m), digits + 2) for m in measures]
    lines = ["  ".join(["system".ljust(name_w)] + [m.rjust(w) for m, w in zip(measures, widths)])]
    for s in systems:
        cells = [f"{results[s][m]:.{digits}f}".rjust(w) if m in results[s] else "-".rjust(w)
                 for m, w in zip(measures, widths)]
        lines.append("  ".join([s.ljust(name_w)] + cells))
    return "\n".join(lines)
