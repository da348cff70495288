"""The training loop: read top to bottom, it is the recipe.

prepare data -> encode once (cached) -> mine negatives -> (teacher scores) -> build the student -> for each
optimizer step: B groups per micro-batch, scores through the fused ops, summed losses, gradient accumulation,
AMP -> periodic held-out nDCG@10 and checkpoint -> save the model directory.

Data parallel under ``torchrun``: every rank builds the same groups (seeded by epoch), takes every world-th
micro-batch, and ``inbatch_ce`` scores each query against the documents of all ranks (gathered with
gradient). Checkpoints hold the model, optimizer, scheduler, AMP scaler, step, position in the epoch and
every RNG, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastrank import losses as L
from fastrank.train.config import CHECKPOINT, TrainConfig
from fastrank.train.data import (TrainData, load_training_queries, pools_from_run, pools_from_teacher, read_teacher,
                                 split_dev)
from fastrank.train.features import FrozenTexts, dense_top, encode_frozen
from fastrank.train.student import MaxSimHead, Student, make_head
from fastrank.trained import write_run_manifest

# Config fields that change what a step computes: a resumed run must keep them.
_RESUME_FIXED = ("scorer", "loss", "negatives", "batch_size", "accumulate", "seed", "proj_dim", "freeze_encoder",
                 "mine_depth", "query_max_length", "doc_max_length", "tau", "gamma0", "amp", "self_distill")


@dataclass
class World:
    """The processes of one training run: rank and size (one process unless torchrun set WORLD_SIZE)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def init(cls, device: torch.device) -> "World":
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def rank0_first(self, fn):
        """``fn()`` on rank 0, then on the others: rank 0 fills the cache that the others then read."""
        out = fn() if self.rank == 0 else None
        self.barrier()
        if self.rank != 0:
            out = fn()
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' ``x`` concatenated along dim 0, with gradient flowing back to each rank's own part."""
        if self.size == 1:
            return x
        import torch.distributed.nn.functional as dnn

        return torch.cat(dnn.all_gather(x.contiguous()), 0)


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    dev_dense_ndcg10: float | None
    history: list = field(default_factory=list)  # [{"step", "dev_ndcg10", "loss"}]
    best_step: int | None = None
    finished: bool = True  # False: stopped by stop_after; resume to continue


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _log(world: World, msg: str) -> None:
    if world.rank == 0:
        from tqdm.auto import tqdm

        tqdm.write(msg)


# -- data ------------------------------------------------------------------------------------------------
def _teacher_from_model(cfg: TrainConfig, queries, corpus, pairs: list[tuple[str, str]], cache: Path, device):
    """Score every (query, document) pair once with a local cross-encoder; cached as jsonl beside the encodings."""
    import hashlib
    import json

    from fastrank.encoders import CrossEncoder

    key = hashlib.sha256(json.dumps([str(Path(cfg.teacher_model).resolve()), pairs]).encode()).hexdigest()[:20]
    path = cache / f"teacher-{key}.jsonl"
    if path.is_file():
        return read_teacher(path)
    cross = CrossEncoder(cfg.teacher_model, device=device)
    scores = cross.score([queries[q] for q, _ in pairs], [corpus[p] for _, p in pairs], progress=cfg.progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tmp"), "w") as f:
        for (q, p), s in zip(pairs, scores.tolist()):
            f.write(json.dumps({"qid": q, "pid": p, "score": s}) + "\n")
    path.with_suffix(".tmp").replace(path)
    return read_teacher(path)


def prepare(cfg: TrainConfig, world: World, device: torch.device):
    """Texts, encodings, pools and teacher scores: everything a step reads."""
    from fastrank.encoders import Encoder

    corpus, queries, qrels, positives = load_training_queries(cfg.data, cfg.teacher)
    teacher = read_teacher(cfg.teacher) if cfg.teacher else None
    if teacher is not None:  # only pairs the teacher scored can be trained on
        positives = {q: [p for p in ps if (q, p) in teacher] for q, ps in positives.items()}
        positives = {q: ps for q, ps in positives.items() if ps}
    train_q, dev_q = split_dev(list(positives), cfg.dev_queries, cfg.seed)
    base = Encoder(cfg.model, normalize=False, device=device, batch_size=cfg.encode_batch_size)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"
    qids = train_q + dev_q
    encoded = world.rank0_first(lambda: (
        encode_frozen(base, list(corpus), list(corpus.values()), max_length=cfg.doc_max_length,
                      tokens=cfg.freeze_encoder, cache_dir=cache, name="corpus", progress=cfg.progress and world.rank == 0),
        encode_frozen(base, qids, [queries[q] for q in qids], max_length=cfg.query_max_length,
                      tokens=cfg.freeze_encoder, cache_dir=cache, name="queries", progress=cfg.progress and world.rank == 0)))
    corpus_f, query_f = encoded
    dense_run = dense_top(query_f, corpus_f, qids, max(cfg.mine_depth, 100))
    if cfg.candidates:
        from fastrank.data import read_run

        pools = pools_from_run(read_run(cfg.candidates), positives, cfg.mine_depth)
    elif teacher is not None:
        pools = pools_from_teacher(teacher, positives)
    else:
        pools = pools_from_run(dense_run, positives, cfg.mine_depth)
    if cfg.teacher_model:
        pairs = sorted({(q, p) for q in train_q for p in positives[q] + pools.get(q, [])})
        teacher = world.rank0_first(lambda: _teacher_from_model(cfg, queries, corpus, pairs, cache, device))
    too_small = [q for q in train_q if len(pools.get(q, [])) < cfg.negatives - 1]
    if too_small:
        _log(world, f"train: {len(too_small)} of {len(train_q)} training queries have fewer than {cfg.negatives - 1} "
                    "negatives in their pool and are left out")
        train_q = [q for q in train_q if q not in set(too_small)]
    if not train_q:
        raise ValueError("no training query has a positive and enough negatives; lower --negatives or give candidates")
    data = TrainData(corpus, queries, positives, pools, train_q, dev_q, qrels, teacher)
    dev_run = {q: dense_run[q] for q in dev_q}
    return data, base, corpus_f, query_f, dev_run


# -- one step --------------------------------------------------------------------------------------------
def _features(student: Student, frozen: tuple[FrozenTexts, FrozenTexts] | None, data: TrainData, groups,
              cfg: TrainConfig, device, pad_docs_to: int | None):
    """q (B, Lq, H), q_mask, d (B*K, Ld, H), d_mask for the groups' texts."""
    qids = [q for q, _ in groups]
    pids = [p for _, ps in groups for p in ps]
    if frozen is not None:
        corpus_f, query_f = frozen
        q, qm = query_f.padded(qids, device)
        d, dm = corpus_f.padded(pids, device)
    else:
        q, qm = student.hidden([data.queries[x] for x in qids], cfg.query_max_length, device)
        d, dm = student.hidden([data.corpus[x] for x in pids], cfg.doc_max_length, device)
    if pad_docs_to is not None and d.shape[1] < pad_docs_to:  # equal shapes across ranks for all_gather
        d = torch.nn.functional.pad(d, (0, 0, 0, pad_docs_to - d.shape[1]))
        dm = torch.nn.functional.pad(dm, (0, pad_docs_to - dm.shape[1]))
    return q, qm, d, dm


@torch.no_grad()
def base_maxsim(q, qm, d, dm) -> torch.Tensor:
    """(B, K) zero-shot MaxSim of the base encoder's normalised states: the self-distillation teacher."""
    from fastrank.ops.maxsim import maxsim

    b = q.shape[0]
    qn = torch.nn.functional.normalize(q.detach().float(), dim=-1)
    dn = torch.nn.functional.normalize(d.detach().float(), dim=-1)
    return maxsim(qn.unsqueeze(1), dn.view(b, -1, *dn.shape[1:]), qm.unsqueeze(1), dm.view(b, -1, dm.shape[-1]))


def group_loss(cfg: TrainConfig, head, q, qm, d, dm, t, world: World, backend=None) -> torch.Tensor:
    """The sum of ``cfg.loss`` over one micro-batch of B groups (positive in column 0)."""
    b = q.shape[0]
    k = d.shape[0] // b
    s = head.score(q, qm, d.view(b, k, *d.shape[1:]), dm.view(b, k, -1), backend=backend)
    total = 0.0
    for name in cfg.loss:
        if name == "ce":
            total = total + L.inbatch_ce(s, torch.zeros(b, dtype=torch.int64, device=s.device), cfg.tau, backend=backend)
        elif name == "inbatch_ce":
            d_all, dm_all = world.gather(d), world.gather(dm)
            s_all = head.score_all(q, qm, d_all, dm_all, backend=backend)
            target = (world.rank * b + torch.arange(b, device=s.device)) * k
            total = total + L.inbatch_ce(s_all, target, cfg.tau, backend=backend)
        else:
            opts = {"tau": cfg.tau} if name in ("softmax_ce", "kl_div") else (
                {"gamma0": cfg.gamma0} if name == "rankdistil_b" else {})
            total = total + getattr(L, name)(s, t.to(s.device, s.dtype), backend=backend, **opts)
    return total


# -- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def dev_ndcg10(student: Student, frozen, data: TrainData, dev_run, cfg: TrainConfig, device, amp) -> float:
    """nDCG@10 of the head re-ranking the base encoder's dense top-100 of the held-out training queries."""
    from fastrank.evaluate import evaluate

    was_training = student.training
    student.eval()
    run = {}
    for qid, cands in dev_run.items():
        pids = list(cands)
        scores = []
        for start in range(0, len(pids), 64):
            chunk = pids[start:start + 64]
            q, qm, d, dm = _features(student, frozen, data, [(qid, chunk)], cfg, device, None)
            with amp():
                scores.append(student.head.score(q, qm, d.unsqueeze(0), dm.unsqueeze(0), backend=cfg.backend)[0].float())
        run[qid] = dict(zip(pids, torch.cat(scores).tolist()))
    student.train(was_training)
    return evaluate({q: data.qrels[q] for q in dev_run}, run, ["nDCG@10"])["nDCG@10"]


# -- the loop --------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, stop_after: int | None = None) -> TrainResult:
    """Train ``config`` and write its model directory to ``config.out``; ``stop_after`` ends this run after
    that many optimizer steps (with a checkpoint), to be continued with ``resume=True``."""
    from fastrank.progress import progress_bar

    cfg = config.check()
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    world = World.init(device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if world.rank == 0:  # before the cache or a checkpoint: a run stopped at any point is recognised as fastrank's
        write_run_manifest(out, cfg.run_entries())
    data, base, corpus_f, query_f, dev_run = prepare(cfg, world, device)
    frozen = (corpus_f, query_f) if cfg.freeze_encoder else None

    hidden = base.hidden_size
    head = make_head(cfg.scorer, hidden, proj_dim=cfg.proj_dim, lq=cfg.query_max_length, ld=cfg.doc_max_length,
                     row_hidden=cfg.lite_row_hidden, col_hidden=cfg.lite_col_hidden)
    if isinstance(head, MaxSimHead) and frozen is not None:
        g = torch.Generator().manual_seed(cfg.seed)
        rows = torch.randperm(corpus_f.tokens.vectors.shape[0], generator=g)[:50_000]
        head.init_pca(corpus_f.tokens.vectors[rows])
    encoder = None
    if not cfg.freeze_encoder:
        encoder = base.model.float().train()  # the base encoder itself: a copy would hold its weights twice
        for p in encoder.parameters():
            p.requires_grad_(True)
    student = Student(head, encoder, base.tokenizer).to(device)
    model = student
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    micro_per_epoch = math.ceil(len(data.train_qids) / cfg.batch_size)
    if micro_per_epoch < world.size * cfg.accumulate:
        raise ValueError(f"{len(data.train_qids)} training queries make {micro_per_epoch} micro-batches of batch_size "
                         f"{cfg.batch_size}, fewer than one optimizer step needs ({world.size} ranks x accumulate "
                         f"{cfg.accumulate}): lower batch_size or accumulate")
    steps_per_epoch = micro_per_epoch // (world.size * cfg.accumulate)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup * total_steps)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup
                                                  else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    step, epoch, micro = 0, 0, 0
    history: list[dict] = []
    best = (-1.0, None, None)  # (dev nDCG@10, step, head state)
    if cfg.resume:
        ck = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
        now = cfg.to_json()
        # tau None: no loss of this run reads a temperature, whatever value an older checkpoint recorded.
        changed = [k for k in _RESUME_FIXED
                   if ck["config"].get(k) != now.get(k) and not (k == "tau" and now[k] is None)]
        if changed:
            raise ValueError(f"resume: {', '.join(changed)} differ from the checkpoint's; a resumed run must keep them")
        student.head.load_state_dict(ck["head"])
        if encoder is not None:
            encoder.load_state_dict(ck["encoder"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        step, epoch, micro, history = ck["step"], ck["epoch"], ck["micro"], ck["history"]
        best = tuple(ck["best"])
        _set_rng_state(ck["rng"])
        _log(world, f"train: resumed at step {step} (epoch {epoch + 1}) from {out / CHECKPOINT}")

    dev_dense = None
    if world.rank == 0 and data.dev_qids:
        from fastrank.evaluate import evaluate

        dev_dense = evaluate({q: data.qrels[q] for q in dev_run}, dev_run, ["nDCG@10"])["nDCG@10"]
        _log(world, f"train: {len(data.train_qids)} training queries, {len(data.dev_qids)} held out; "
                    f"dense (base encoder) nDCG@10 on them {dev_dense:.4f}")
    eval_every = cfg.eval_every or steps_per_epoch
    pad_docs = cfg.doc_max_length if world.size > 1 else None
    k = cfg.negatives

    def save_checkpoint() -> None:
        if world.rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        state = {"config": cfg.to_json(), "step": step, "epoch": epoch, "micro": micro, "history": history,
                 "best": best, "rng": _rng_state(), "head": student.head.state_dict(),
                 "encoder": encoder.state_dict() if encoder is not None else None,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
        torch.save(state, out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(out / CHECKPOINT)

    bar = progress_bar(total=total_steps, initial=step, desc=f"train {cfg.scorer}", unit="step",
                       enabled=cfg.progress and world.rank == 0)
    ran = 0
    t_docs, n_docs, running = time.perf_counter(), 0, None
    model.train()
    while step < total_steps and (stop_after is None or ran < stop_after):
        groups = data.groups(epoch, cfg.seed, k)
        batches = [groups[i:i + cfg.batch_size] for i in range(0, len(groups), cfg.batch_size)]
        usable = steps_per_epoch * world.size * cfg.accumulate
        while micro < usable and step < total_steps and (stop_after is None or ran < stop_after):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for a in range(cfg.accumulate):
                batch = batches[micro + a * world.size + world.rank]
                with amp():
                    # Through the DDP wrapper when there is one, so its gradient hooks see every parameter used.
                    loss, n = model(_micro_batch_loss, batch, frozen=frozen, data=data, cfg=cfg, device=device,
                                    pad_docs=pad_docs, world=world)
                scaler.scale(loss / cfg.accumulate).backward()
                step_loss += float(loss.detach()) / cfg.accumulate
                n_docs += n
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            micro += world.size * cfg.accumulate
            step += 1
            ran += 1
            running = step_loss if running is None else 0.9 * running + 0.1 * step_loss
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", docs_s=f"{n_docs * world.size / (time.perf_counter() - t_docs):.0f}")
            if step % eval_every == 0 or step == total_steps:
                entry = {"step": step, "loss": running}
                if world.rank == 0 and data.dev_qids:
                    entry["dev_ndcg10"] = dev_ndcg10(student, frozen, data, dev_run, cfg, device, amp)
                    if entry["dev_ndcg10"] > best[0]:
                        best = (entry["dev_ndcg10"], step, copy.deepcopy(student.head.state_dict()))
                    _log(world, f"train: step {step}/{total_steps} loss {running:.4f} held-out nDCG@10 "
                                f"{entry['dev_ndcg10']:.4f} (dense {dev_dense:.4f})")
                history.append(entry)
                save_checkpoint()
        if micro >= usable:
            epoch, micro = epoch + 1, 0
    bar.close()
    if step < total_steps:  # stopped early on request: the checkpoint is what a resume continues from
        save_checkpoint()
        world.barrier()
        return TrainResult(out, step, time.perf_counter() - t_start, dev_dense, history, best[1], finished=False)
    best_step = step
    if cfg.keep == "best" and best[2] is not None:
        student.head.load_state_dict(best[2])
        best_step = best[1]
    if world.rank == 0:
        _save(cfg, student, base, encoder, history, best_step, dev_dense, time.perf_counter() - t_start, world)
    world.barrier()
    return TrainResult(out, step, time.perf_counter() - t_start, dev_dense, history, best_step)


def _micro_batch_loss(student: Student, batch, *, frozen, data: TrainData, cfg: TrainConfig, device, pad_docs,
                      world: World):
    q, qm, d, dm = _features(student, frozen, data, batch, cfg, device, pad_docs)
    if data.teacher is not None:
        t = data.teacher_matrix(batch, cfg.negatives)
    elif cfg.self_distill:
        t = base_maxsim(q, qm, d, dm)
    else:
        t = None
    return group_loss(cfg, student.head, q, qm, d, dm, t, world, cfg.backend), d.shape[0]


def _save(cfg: TrainConfig, student: Student, base, encoder, history, best_step, dev_dense, seconds, world) -> None:
    from fastrank.bench.machine import machine_info
    from fastrank.trained import save_trained

    training = {"config": cfg.to_json(), "history": history, "kept_step": best_step, "dev_dense_ndcg10": dev_dense,
                "seconds": round(seconds, 1), "world_size": world.size, "machine": machine_info()}
    save_trained(cfg.out, scorer=cfg.scorer, model=encoder if encoder is not None else base.model,
                 tokenizer=base.tokenizer, head_state=student.head.head_state(), pooling=base.pooling,
                 query_max_length=cfg.query_max_length, doc_max_length=cfg.doc_max_length,
                 base_model=str(base.path), training=training)
