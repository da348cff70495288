"""``fastrank train DATA OUT``: the command-line face of :func:`fastrank.train.train`."""
from __future__ import annotations

import argparse


def _losses(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split("+") if part.strip())


def add_cli(sub) -> None:
    from fastrank.train.config import AMP, LOSSES, SCORERS

    p = sub.add_parser(
        "train", help="train a student re-ranker (dense, MaxSim or LITE head) with fused scorers and losses",
        description="Train on a BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv) and write a model "
                    "directory OUT that --model accepts in index, retrieve and rerank. Groups are one query, a "
                    "positive from the qrels and K-1 hard negatives (the base encoder's dense top --mine-depth, or "
                    "--candidates). Without a teacher the labels come from the qrels (loss ce). On a CPU the encoder "
                    "is frozen by default: the corpus is encoded once (cached) and only the scorer head trains.")
    p.add_argument("data", help="BEIR folder with qrels/train.tsv (the test split is never read)")
    p.add_argument("out", help="directory to write the trained model (and checkpoint.pt, cache/) to: absent, empty, "
                               "or one `fastrank train` wrote (files of anyone else's are never overwritten)")
    p.add_argument("--scorer", default="lite", choices=SCORERS, help="head to train (default lite)")
    p.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the head alone on cached encoder states (default: on CPU yes, on CUDA no)")
    p.add_argument("--loss", type=_losses, metavar="NAME[+NAME...]",
                   help=f"one or a sum of: {', '.join(LOSSES)} (default margin_mse with a teacher, ce without)")
    p.add_argument("--tau", type=float, help="temperature of ce, inbatch_ce, softmax_ce, kl_div (default 1; dense 0.05)")
    p.add_argument("--gamma0", type=float, default=0.0, help="rankdistil_b's negative margin (default 0)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--teacher", metavar="FILE",
                   help="teacher scores: TSV 'score_pos score_neg qid pid_pos pid_neg' or jsonl {qid, pid, score} "
                        "(default: no teacher file)")
    t.add_argument("--teacher-model", metavar="DIR", help="a local cross-encoder scoring every training pair once (cached) (default: none)")
    p.add_argument("--self-distill", action=argparse.BooleanOptionalAction, default=None,
                   help="without a teacher, also distil the base encoder's zero-shot MaxSim over each group (default: "
                        "on for lite, whose MLPs overfit the qrels' labels alone; loss ce+kl_div)")
    p.add_argument("--candidates", metavar="RUN", help="TREC run or candidate TSV to draw negatives from instead of mining (default: mined "
                        "from the dense top --mine-depth)")
    p.add_argument("--negatives", type=int, default=8, metavar="K",
                   help="candidates per group: the positive and K-1 negatives (default 8)")
    p.add_argument("--mine-depth", type=int, default=100, help="negatives come from the top N (default 100)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="queries per micro-batch (default 32)")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, help="optimizer steps (default: --epochs decides)")
    n.add_argument("--epochs", type=int, help="passes over the training queries (default 10 frozen, 1 fine-tuning)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3 head only, 2e-5 with the encoder)")
    p.add_argument("--amp", choices=AMP, help="autocast dtype (fp16 on CUDA only) (default: none, float32 throughout)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps in this run (default: run to the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, initialisation and dropout")
    p.add_argument("--dev-queries", type=int, default=100,
                   help="training queries held out for nDCG@10 during training (default 100, at most a fifth)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations and checkpoints (default: an epoch)")
    p.add_argument("--keep", choices=("best", "last"),
                   help="save the head with the best held-out nDCG@10 (default; last with --dev-queries 0) or the "
                        "last one")
    p.add_argument("--proj-dim", type=int, help="maxsim: token dim after projection (default 128); lite: Small-LITE")
    p.add_argument("--model", help="base encoder directory (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--encode-batch-size", type=int, default=64, help="texts per encoder pass when caching (default 64)")
    p.add_argument("--cache-dir", help="where encodings and teacher scores are cached (default OUT/cache)")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from fastrank.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, scorer=args.scorer, model=args.model, freeze_encoder=args.freeze_encoder,
        loss=args.loss, tau=args.tau, gamma0=args.gamma0, teacher=args.teacher, teacher_model=args.teacher_model,
        self_distill=args.self_distill, candidates=args.candidates, negatives=args.negatives,
        mine_depth=args.mine_depth, batch_size=args.batch_size,
        accumulate=args.accumulate, steps=args.steps, epochs=args.epochs, lr=args.lr, amp=args.amp,
        resume=args.resume, seed=args.seed, device=args.device, dev_queries=args.dev_queries,
        eval_every=args.eval_every, keep=args.keep, proj_dim=args.proj_dim, encode_batch_size=args.encode_batch_size,
        cache_dir=args.cache_dir, progress=not args.no_progress, backend=args.backend)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    result = train(cfg, stop_after=args.stop_after)
    if not result.finished:
        print(f"stopped after step {result.steps} in {result.seconds:.0f} s; continue with --resume")
        return 0
    last = result.history[-1] if result.history else {}
    msg = f"trained {cfg.scorer} for {result.steps} steps in {result.seconds:.0f} s into {result.out}"
    if result.dev_dense_ndcg10 is not None and result.history:
        kept = next((h for h in result.history if h["step"] == result.best_step), last)
        msg += (f"; held-out nDCG@10 {kept.get('dev_ndcg10', float('nan')):.4f} at step {result.best_step} "
                f"(dense base encoder {result.dev_dense_ndcg10:.4f})")
    print(msg)
    return 0
