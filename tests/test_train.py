"""fastrank train: option checks before anything loads, the step's losses against the eager references, exact
resume, gradient accumulation and 2-process data parallelism equal to one big batch, teachers, and the trained
directory working in index / retrieve / rerank."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("faiss")
pytest.importorskip("ir_measures")

from fastrank.cli import main  # noqa: E402
from fastrank.data import load_beir, read_run  # noqa: E402
from fastrank.train import TrainConfig, train  # noqa: E402
from fastrank.train.data import TrainData, read_teacher  # noqa: E402
from fastrank.train.loop import World, group_loss  # noqa: E402
from fastrank.train.student import make_head  # noqa: E402
from fastrank.trained import TrainedModelError, load_trained  # noqa: E402
from tiny_bert import beir_training_folder, small_train_config  # noqa: E402

SCIFACT = Path(__file__).parent / "data" / "scifact-slice"


@pytest.fixture(scope="module")
def beir_train(tmp_path_factory):
    """A BEIR training folder over the SciFact slice's 61 abstracts: 40 queries, each a few words of its
    positive's text (judged 1), so a head can learn something real in a few steps."""
    return beir_training_folder(tmp_path_factory.mktemp("beir-train"), load_beir(SCIFACT).corpus)


def cfg(beir_train, out, **kw):
    return small_train_config(beir_train, out, **kw)


# -- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(loss=("nope",)), "loss: unknown nope"),
    (dict(loss=("margin_mse",), scorer="maxsim"), "needs teacher scores"),
    (dict(loss=("margin_mse",), scorer="lite", self_distill=False), "needs teacher scores"),
    (dict(scorer="dense"), "nothing to train"),
    (dict(steps=3, epochs=2), "steps or epochs, not both"),
    (dict(amp="fp16"), "amp fp16 needs CUDA"),
    (dict(amp="int8"), "amp must be one of"),
    (dict(negatives=1), "negatives must be an integer >= 2"),
    (dict(negatives=30, mine_depth=10), "needs mine_depth >= 29"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(resume=True), "nothing to resume"),
    (dict(keep="first"), "keep must be"),
    (dict(scorer="dense", freeze_encoder=False, proj_dim=64), "proj_dim applies to maxsim"),
    (dict(teacher="/no/such/file"), "teacher: no such file"),
    (dict(model="/no/such/model"), "not a local transformers model"),
])
def test_bad_options_are_refused_before_anything_loads(beir_train, tmp_path, kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        cfg(beir_train, tmp_path / "out", **kw).check()


def test_defaults_follow_the_scorer_and_the_teacher(beir_train, tmp_path):
    lite = cfg(beir_train, tmp_path / "o", scorer="lite").check()
    assert lite.self_distill and lite.loss == ("ce", "kl_div") and lite.freeze_encoder and lite.epochs == 10
    maxsim = cfg(beir_train, tmp_path / "o", scorer="maxsim").check()
    assert not maxsim.self_distill and maxsim.loss == ("ce",) and maxsim.proj_dim == 128 and maxsim.lr == 1e-3
    (tmp_path / "t.tsv").write_text("1\t0\tq1\ta\tb\n")
    taught = cfg(beir_train, tmp_path / "o", scorer="lite", teacher=str(tmp_path / "t.tsv")).check()
    assert not taught.self_distill and taught.loss == ("margin_mse",)
    with pytest.raises(ValueError, match="a teacher is given"):
        cfg(beir_train, tmp_path / "o", teacher=str(tmp_path / "t.tsv"), self_distill=True).check()
    tuned = cfg(beir_train, tmp_path / "o", scorer="dense", freeze_encoder=False).check()
    assert tuned.lr == 2e-5 and tuned.epochs == 1 and tuned.tau == 0.05


def test_self_distillation_teacher_is_the_base_states_maxsim():
    from fastrank import maxsim_ref
    from fastrank.train.loop import base_maxsim

    torch.manual_seed(3)
    q, d = torch.randn(2, 5, 8) * 4, torch.randn(6, 7, 8) * 4
    qm, dm = torch.rand(2, 5) > 0.3, torch.rand(6, 7) > 0.3
    qm[:, 0] = dm[:, 0] = True
    n = torch.nn.functional.normalize
    expected = maxsim_ref(n(q, dim=-1).unsqueeze(1), n(d, dim=-1).view(2, 3, 7, 8), qm.unsqueeze(1), dm.view(2, 3, 7))
    torch.testing.assert_close(base_maxsim(q, qm, d, dm), expected, rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_bad_option_before_encoding(beir_train, tmp_path, capsys):
    root, model = beir_train
    rc = main(["train", str(root), str(tmp_path / "out"), "--model", model, "--scorer", "maxsim", "--loss", "margin_mse+ce",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2 and "needs teacher scores" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    rc = main(["train", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert rc == 2 and "missing corpus.jsonl" in capsys.readouterr().err


# -- the step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["maxsim", "lite", "dense"])
@pytest.mark.parametrize("loss", [("ce",), ("inbatch_ce",), ("margin_mse",), ("m3se",), ("softmax_ce",),
                                  ("kl_div",), ("rankdistil_b",), ("mse", "ce")])
def test_step_loss_and_gradients_match_the_eager_references(scorer, loss):
    torch.manual_seed(1)
    b, k, h = 3, 4, 16
    head = make_head(scorer, h, proj_dim=8 if scorer == "maxsim" else None, lq=6, ld=9, row_hidden=12, col_hidden=10)
    q, d = torch.randn(b, 6, h), torch.randn(b * k, 9, h)
    qm = torch.rand(b, 6) > 0.2
    dm = torch.rand(b * k, 9) > 0.3
    qm[:, 0] = dm[:, 0] = True
    t = torch.randn(b, k) * 3
    config = TrainConfig(data=".", out=".", scorer=scorer, loss=loss, tau=0.7)
    grads = []
    for backend in (None, "reference"):
        head.zero_grad()
        qg, dg = q.clone().requires_grad_(), d.clone().requires_grad_()  # the encoder's side of the gradient
        value = group_loss(config, head, qg, qm, dg, dm, t, World(), backend)
        value.backward()
        grads.append((value.detach(), [qg.grad, dg.grad] + [p.grad.clone() for p in head.parameters()]))
    (v1, g1), (v2, g2) = grads
    # float32 throughout; the fused losses sum pairs in another order than the references (e.g. margin_mse's
    # P x N pairs), which moves gradients of ~0.1 by a few 1e-6.
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=2e-5)


# -- whole runs ----------------------------------------------------------------------------------------
def _head(out) -> dict:
    return torch.load(Path(out) / "head.pt", weights_only=True)


def test_maxsim_training_learns_and_the_directory_serves_index_retrieve_rerank(beir_train, tmp_path, capsys):
    root, _ = beir_train
    result = train(cfg(beir_train, tmp_path / "m", scorer="maxsim", proj_dim=16, steps=24, eval_every=6, lr=3e-3,
                       keep="last"))
    assert result.finished and result.steps == 24 and [h["step"] for h in result.history] == [6, 12, 18, 24]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    trained = load_trained(tmp_path / "m")
    assert trained.scorer == "maxsim" and trained.projection.shape == (16, 32)
    assert trained.encoder().token_dim == 16
    # The same head scores the same pair identically through the served encoder and through the trainer.
    rc = main(["index", str(root / "corpus.jsonl"), str(tmp_path / "ix"), "--tokens", "--exhaustive", "--model",
               str(tmp_path / "m"), "--device", "cpu"])
    assert rc == 0
    queries = root / "queries.jsonl"
    rc = main(["retrieve", str(tmp_path / "ix"), str(queries), str(tmp_path / "run.txt"), "-k", "10"])
    assert rc == 0 and len(read_run(tmp_path / "run.txt")) == 40
    rc = main(["rerank", str(tmp_path / "run.txt"), str(queries), str(root / "corpus.jsonl"), str(tmp_path / "rr.txt"),
               "--model", str(tmp_path / "m"), "--device", "cpu", "--token-dtype", "int8"])
    assert rc == 0
    first, reranked = read_run(tmp_path / "run.txt"), read_run(tmp_path / "rr.txt")
    for qid in first:  # exhaustive int8 MaxSim retrieval and int8 MaxSim re-ranking agree on the scores
        for pid, score in first[qid].items():
            assert reranked[qid][pid] == pytest.approx(score, abs=1e-4)


def test_lite_directory_is_found_by_rerank_without_lite_flag(beir_train, tmp_path, capsys):
    root, _ = beir_train
    train(cfg(beir_train, tmp_path / "l", scorer="lite", steps=3, lite_row_hidden=16, lite_col_hidden=8))
    trained = load_trained(tmp_path / "l")
    assert trained.lite is not None and (trained.lite.lq, trained.lite.ld) == (32, 200)
    corpus = load_beir(SCIFACT).corpus
    (tmp_path / "cands.tsv").write_text("".join(f"q1\t{d}\t{i + 1}\t{10 - i}\n" for i, d in enumerate(list(corpus)[:8])))
    out = tmp_path / "rr.txt"
    rc = main(["rerank", str(tmp_path / "cands.tsv"), str(root / "queries.jsonl"), str(root / "corpus.jsonl"), str(out),
               "--scorer", "lite", "--model", str(tmp_path / "l"), "--device", "cpu"])
    assert rc == 0 and len(read_run(out)["q1"]) == 8
    rc = main(["rerank", str(tmp_path / "cands.tsv"), str(root / "queries.jsonl"), str(root / "corpus.jsonl"), str(out),
               "--scorer", "lite", "--device", "cpu"])
    assert rc == 2 and "needs a LITE head" in capsys.readouterr().err
    # A changed head is caught by its checksum.
    with open(tmp_path / "l" / "head.pt", "ab") as f:
        f.write(b"0")
    with pytest.raises(TrainedModelError, match="checksum"):
        load_trained(tmp_path / "l")


def test_resume_continues_exactly(beir_train, tmp_path):
    straight = train(cfg(beir_train, tmp_path / "a", scorer="maxsim", proj_dim=8, steps=6, eval_every=2, keep="last"))
    part = train(cfg(beir_train, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=6, eval_every=2, keep="last"),
                 stop_after=3)
    assert not part.finished and part.steps == 3 and not (tmp_path / "b" / "head.pt").exists()
    with pytest.raises(ValueError, match="already holds a training run"):
        cfg(beir_train, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=6).check()
    with pytest.raises(ValueError, match="negatives differ"):
        train(cfg(beir_train, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=6, negatives=3, resume=True))
    resumed = train(cfg(beir_train, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=6, eval_every=2, keep="last",
                        resume=True))
    assert resumed.steps == straight.steps == 6
    assert torch.equal(_head(tmp_path / "a")["projection"], _head(tmp_path / "b")["projection"])
    assert [h["dev_ndcg10"] for h in straight.history] == [h["dev_ndcg10"] for h in resumed.history]


def test_too_few_queries_for_one_step_is_an_error(beir_train, tmp_path):
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        train(cfg(beir_train, tmp_path / "few", scorer="maxsim", proj_dim=8, steps=1, batch_size=8, accumulate=5))


def test_gradient_accumulation_equals_one_bigger_batch(beir_train, tmp_path):
    kw = dict(scorer="maxsim", proj_dim=8, steps=2, keep="last", warmup=0.0, loss=("ce",))
    train(cfg(beir_train, tmp_path / "acc", batch_size=4, accumulate=2, **kw))
    train(cfg(beir_train, tmp_path / "big", batch_size=8, accumulate=1, **kw))
    torch.testing.assert_close(_head(tmp_path / "acc")["projection"], _head(tmp_path / "big")["projection"],
                               rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_in_process(root, out, args, threads: int) -> torch.Tensor:
    """``fastrank train`` in this process with ``threads`` intra-op threads; the trained projection."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert main(["train", str(root), str(out), *args]) == 0
    finally:
        torch.set_num_threads(before)
    return _head(out)["projection"]


def test_torchrun_two_cpu_processes_equal_one_process_with_the_whole_batch(beir_train, tmp_path):
    """Data parallel on gloo: 2 ranks x B=4 with in-batch negatives gathered across ranks train the same head
    as one process with B=8 (the same groups, every query against all 8 x K documents), up to float reordering.

    What reordering costs here is measured, not assumed: the one-process run is repeated with 2 threads
    instead of 1, which changes only how BLAS and LAPACK associate their sums (the SVD of the PCA init and
    every GEMM of the gradient). The 2-rank run reorders other sums (gloo's average of two half-batch
    gradients, documents padded to 200 for the gather), and may differ from the 1-thread run (its ranks run 1
    thread each, so the init is the same) by at most twice that measured noise."""
    root, model = beir_train
    common = ["--model", model, "--device", "cpu", "--scorer", "maxsim", "--proj-dim", "8", "--negatives", "4",
              "--mine-depth", "20", "--steps", "2", "--keep", "last", "--loss", "ce+inbatch_ce", "--dev-queries", "8",
              "--no-progress", "--cache-dir", str(root / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "fastrank.cli", "train", str(root),
                           str(tmp_path / "ddp"), "--batch-size", "4", *common],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "fastrank_model.json").read_text())
    assert manifest["training"]["world_size"] == 2
    ddp = _head(tmp_path / "ddp")["projection"]
    one = _train_in_process(root, tmp_path / "one", ["--batch-size", "8", *common], threads=1)
    noise = (_train_in_process(root, tmp_path / "one-2t", ["--batch-size", "8", *common], threads=2) - one).abs()
    diff = (ddp - one).abs()
    # A floor for a torch whose BLAS ignores the thread count (no measured noise at all): a reordered sum
    # may still move each weight by a rounding or two per step and per update, so 8 roundings of the largest
    # weight over 2 steps. Measured on a Zen 4 EPYC: the floor is 4.9e-7; the 2-thread noise has median
    # 1.3e-6 and max 1.7e-5 (8.4e-7 and 4.7e-6 with torch's BLAS limited to AVX2); the 2-rank run differs by
    # at most 3e-8; a missing gather (in-batch negatives from this rank only) moves the weights by median 2e-5
    # and max 2e-3, a missing gradient all-reduce (no DDP) by median 1.5e-4 and max 3e-3. A gradient summed
    # instead of averaged over ranks cannot show: AdamW's step does not depend on the gradient's scale.
    floor = 8 * torch.finfo(torch.float32).eps * one.abs().max().item()
    max_bound, median_bound = max(2 * noise.max().item(), floor), max(2 * noise.median().item(), floor)
    assert diff.max() <= max_bound and diff.median() <= median_bound, (
        f"2 ranks vs 1 process: max {diff.max():.3g} (bound {max_bound:.3g}), median {diff.median():.3g} "
        f"(bound {median_bound:.3g}); 1 vs 2 threads: max {noise.max():.3g}, median {noise.median():.3g}")


# -- teachers ------------------------------------------------------------------------------------------
def test_teacher_files_hofstatter_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("5.5\t1.0\tq1\tp1\tp2\n4.0\t-2\tq1\tp1\tp3\n")
    with pytest.raises(ValueError, match="differs from an earlier"):
        read_teacher(tsv)
    tsv.write_text("5.5\t1.0\tq1\tp1\tp2\n5.5\t-2\tq1\tp1\tp3\n")
    assert read_teacher(tsv) == {("q1", "p1"): 5.5, ("q1", "p2"): 1.0, ("q1", "p3"): -2.0}
    js = tmp_path / "t.jsonl"
    js.write_text('{"qid": "q1", "pid": "p1", "score": 2}\n{"qid": 7, "pid": "p2", "score": -1.5}\n')
    assert read_teacher(js) == {("q1", "p1"): 2.0, ("7", "p2"): -1.5}
    js.write_text('{"qid": "q1", "pid": "p1"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: expected"):
        read_teacher(js)
    tsv.write_text("5.5 1.0 q1 p1\n")
    with pytest.raises(ValueError, match=r"t.tsv:1: expected score_pos"):
        read_teacher(tsv)


def test_training_with_a_teacher_file_reads_its_scores(beir_train, tmp_path):
    root, _ = beir_train
    corpus = [json.loads(line)["_id"] for line in (root / "corpus.jsonl").read_text().splitlines()]
    qrels = [line.split("\t") for line in (root / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    lines = []
    for i, (q, pos, _) in enumerate(qrels):
        for j, neg in enumerate(c for c in corpus if c != pos):
            if j < 6:
                lines.append(f"{10 + i % 3}\t{-j / 2}\t{q}\t{pos}\t{neg}\n")
    (tmp_path / "teacher.tsv").write_text("".join(lines))
    result = train(cfg(beir_train, tmp_path / "t", scorer="maxsim", proj_dim=8, steps=3,
                       teacher=str(tmp_path / "teacher.tsv")))
    manifest = load_trained(tmp_path / "t").manifest
    assert result.finished and manifest["training"]["config"]["loss"] == ["margin_mse"]
    data = TrainData({}, {}, {}, {}, [], [], {}, read_teacher(tmp_path / "teacher.tsv"))
    t = data.teacher_matrix([(qrels[4][0], [qrels[4][1], corpus[0] if corpus[0] != qrels[4][1] else corpus[1]])], 2)
    assert t[0, 0] == 10 + 4 % 3 and t[0, 1] in (0.0, -0.5)


def test_cross_encoder_teacher_is_scored_once_and_cached(beir_train, tmp_path):
    from tiny_bert import make_tiny_cross_encoder

    root, _ = beir_train
    corpus = [json.loads(line)["text"] for line in (root / "corpus.jsonl").read_text().splitlines()]
    cross = make_tiny_cross_encoder(tmp_path / "cross", corpus)
    kw = dict(scorer="maxsim", proj_dim=8, steps=2, teacher_model=str(cross), loss=("kl_div", "ce"),
              cache_dir=str(tmp_path / "cache"))
    train(cfg(beir_train, tmp_path / "x1", **kw))
    cached = sorted((tmp_path / "cache").glob("teacher-*.jsonl"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    stamp = cached[0].stat().st_mtime_ns
    train(cfg(beir_train, tmp_path / "x2", **kw))
    assert cached[0].stat().st_mtime_ns == stamp
    assert torch.equal(_head(tmp_path / "x1")["projection"], _head(tmp_path / "x2")["projection"])


# -- fine-tuning the encoder ---------------------------------------------------------------------------
def test_full_fine_tuning_trains_and_saves_the_encoder_with_amp(beir_train, tmp_path):
    from fastrank.encoders import Encoder

    root, model = beir_train
    train(cfg(beir_train, tmp_path / "ft", scorer="dense", freeze_encoder=False, steps=2, lr=1e-3, amp="bf16",
              loss=("ce", "inbatch_ce")))
    tuned = load_trained(tmp_path / "ft").encoder()
    base = Encoder(model, device="cpu")
    texts = ["a query about cells", "protein folding"]
    before, after = base.encode_dense(texts, progress=False), tuned.encode_dense(texts, progress=False)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
