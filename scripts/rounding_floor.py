"""How far a training recipe's quality moves under rounding alone, for the fused step and the eager one.

Trains ``fastrank train``'s recipe (frozen encoder, one scorer head) several times with the same seed (same
initial head, data order, held-out split, negatives), each run's initial head weights moved up, down or not at
all by a relative 2**-23 (one or two units in the last place; drawn from a per-run generator; run 0 is
unperturbed), once with
the fused ops and once with the eager references. What separates two runs of one backend is then rounding
and nothing else, so their spread is the floor below which no comparison of backends can see: a fused-minus-
eager difference means something only against it.

Every run's head is scored on the test queries by re-ranking a first-stage run (``fastrank retrieve``'s
output) with the frozen encodings the training cached, and on the held-out queries as training logs it.

    python scripts/rounding_floor.py ../shared/data/beir-scifact OUT --first-stage dense.run --runs 4 \\
        --cache-dir CACHE [--scorer lite] [--seed 0]

writes OUT/<backend>-<run>/ (each a ``fastrank train`` model directory) and OUT/rounding_floor.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

BACKENDS = {"fused": None, "eager": "reference"}


def perturbed(make_head, run: int):
    """``make_head`` whose head has every weight w moved to w (1 + k 2**-23), k in {-1, 0, 1} drawn per weight
    (one or two units in the last place; zeros stay zero; run 0: unchanged)."""
    def make(*args, **kwargs):
        head = make_head(*args, **kwargs)
        if run:
            g = torch.Generator().manual_seed(1_000_003 * run)
            with torch.no_grad():
                for p in head.parameters():
                    step = torch.randint(-1, 2, p.shape, generator=g).to(p.dtype)
                    p.copy_(p + step * p.abs() * 2.0 ** -23)
        return head
    return make


def train_one(args, backend: str, run: int) -> Path:
    from fastrank.train import loop
    from fastrank.train.config import TrainConfig

    out = Path(args.out) / f"{backend}-{run}"
    if (out / "fastrank_model.json").is_file():
        return out
    cfg = TrainConfig(data=args.data, out=str(out), scorer=args.scorer, freeze_encoder=True, seed=args.seed,
                      cache_dir=args.cache_dir, progress=False, backend=BACKENDS[backend])
    original = loop.make_head
    loop.make_head = perturbed(original, run)
    try:
        t = time.perf_counter()
        loop.train(cfg)
        print(f"{backend}-{run}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        loop.make_head = original
    return out


@torch.no_grad()
def test_ndcg(model_dir: Path, corpus, queries, first_stage, qrels, backend) -> float:
    from fastrank.evaluate import evaluate
    from fastrank.trained import load_trained
    from fastrank.train.student import LiteHead, MaxSimHead

    trained = load_trained(model_dir)
    if trained.scorer == "lite":
        head = LiteHead.__new__(LiteHead)
        torch.nn.Module.__init__(head)
        head.scorer = trained.lite
    else:
        head = MaxSimHead(trained.projection.shape[1], trained.projection.shape[0])
        head.projection.weight.copy_(trained.projection)
    run = {}
    for qid, cands in first_stage.items():
        pids = list(cands)
        q, qm = queries.padded([qid], "cpu")
        scores = []
        for start in range(0, len(pids), 100):
            d, dm = corpus.padded(pids[start:start + 100], "cpu")
            scores.append(head.score(q, qm, d.unsqueeze(0), dm.unsqueeze(0), backend=backend)[0].float())
        run[qid] = dict(zip(pids, torch.cat(scores).tolist()))
    return evaluate({q: qrels[q] for q in run}, run, ["nDCG@10"])["nDCG@10"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv, qrels/test.tsv)")
    ap.add_argument("out", help="a new folder for the runs and rounding_floor.json")
    ap.add_argument("--first-stage", required=True, help="TREC run over the test queries to re-rank")
    ap.add_argument("--runs", type=int, default=4, help="runs per backend (run 0 unperturbed)")
    ap.add_argument("--scorer", default="lite", choices=("lite", "maxsim"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", required=True, help="the encodings cache the runs share")
    args = ap.parse_args()

    from fastrank.data import read_qrels, read_queries, read_run
    from fastrank.encoders import Encoder
    from fastrank.train.data import load_training_queries
    from fastrank.train.features import encode_frozen

    results = []
    for run in range(args.runs):
        for backend in BACKENDS:
            out = train_one(args, backend, run)
            manifest = json.loads((out / "fastrank_model.json").read_text())["training"]
            held = {h["step"]: h["dev_ndcg10"] for h in manifest["history"] if "dev_ndcg10" in h}
            results.append({"backend": backend, "run": run, "kept_step": manifest["kept_step"],
                            "held_out": held[manifest["kept_step"]], "held_out_by_step": held,
                            "seconds": manifest["seconds"]})

    data = Path(args.data)
    corpus_texts, _, _, _ = load_training_queries(args.data, None)
    base = Encoder(None, normalize=False, device="cpu")
    corpus = encode_frozen(base, list(corpus_texts), list(corpus_texts.values()), max_length=200, tokens=True,
                           cache_dir=Path(args.cache_dir), name="corpus")
    qrels = read_qrels(data / "qrels" / "test.tsv")
    first_stage = {q: c for q, c in read_run(args.first_stage).items() if q in qrels}
    texts = read_queries(data / "queries.jsonl")
    qids = sorted(first_stage)
    queries = encode_frozen(base, qids, [texts[q] for q in qids], max_length=32, tokens=True,
                            cache_dir=Path(args.cache_dir), name="test-queries")
    for r in results:
        r["test"] = test_ndcg(Path(args.out) / f"{r['backend']}-{r['run']}", corpus, queries, first_stage, qrels,
                              BACKENDS[r["backend"]])
        print(f"{r['backend']}-{r['run']}: held-out {r['held_out']:.4f} (step {r['kept_step']}) test {r['test']:.4f}",
              flush=True)

    summary = {}
    for backend in BACKENDS:
        rows = [r for r in results if r["backend"] == backend]
        summary[backend] = {m: {"mean": statistics.mean(r[m] for r in rows),
                                "sd": statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0,
                                "min": min(r[m] for r in rows), "max": max(r[m] for r in rows)}
                            for m in ("held_out", "test")}
    for m in ("held_out", "test"):
        diff = summary["fused"][m]["mean"] - summary["eager"][m]["mean"]
        print(f"{m}: fused {summary['fused'][m]['mean']:.4f} (sd {summary['fused'][m]['sd']:.4f}), eager "
              f"{summary['eager'][m]['mean']:.4f} (sd {summary['eager'][m]['sd']:.4f}); fused - eager {diff:+.4f}")
    from fastrank.bench.machine import machine_info

    (Path(args.out) / "rounding_floor.json").write_text(json.dumps(
        {"args": vars(args), "machine": machine_info(), "runs": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
