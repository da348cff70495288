"""Training options and their checks: everything :func:`TrainConfig.check` can refuse is refused before any
model loads or any text is encoded, so a typo costs a second, not the minutes of encoding before it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SCORERS = ("dense", "maxsim", "lite")
# Losses that read teacher scores; "ce" (one-hot over the group, positive first) and "inbatch_ce" (every
# document in the batch, gathered across ranks) need only the qrels' positives.
TEACHER_LOSSES = ("mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b")
LABEL_LOSSES = ("ce", "inbatch_ce")
LOSSES = TEACHER_LOSSES + LABEL_LOSSES
# Losses that read the temperature tau (train.loop.group_loss): the others have none.
TAU_LOSSES = ("ce", "inbatch_ce", "softmax_ce", "kl_div")
AMP = ("bf16", "fp16")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """One training run. ``None`` means "the default for this scorer and device", resolved by :meth:`check`."""

    data: str
    out: str
    scorer: str = "lite"
    model: str | None = None
    freeze_encoder: bool | None = None  # default: frozen on CPU, fine-tuned on CUDA
    loss: tuple[str, ...] | None = None  # default: margin_mse with a teacher, ce without
    tau: float | None = None  # default 1.0; 0.05 for dense (cosine scores)
    gamma0: float = 0.0
    teacher: str | None = None  # scores file: Hofstatter TSV or jsonl {qid, pid, score}
    teacher_model: str | None = None  # a local cross-encoder directory, scored once and cached
    # Without a teacher: also distil the base encoder's own zero-shot MaxSim (a teacher for every candidate, not
    # one label per query). Default on for lite, whose MLPs overfit a few hundred queries' labels alone.
    self_distill: bool | None = None
    candidates: str | None = None  # TREC run / TSV giving each query's negatives instead of mining
    negatives: int = 8  # K: candidates per group, the positive and K-1 negatives
    mine_depth: int = 100  # negatives are drawn from the base encoder's dense top-N (positives removed)
    batch_size: int = 32  # B: queries per micro-batch
    accumulate: int = 1
    steps: int | None = None
    epochs: int | None = None  # default 10 for a frozen encoder, 1 when fine-tuning
    lr: float | None = None  # default 1e-3 for a head alone, 2e-5 when the encoder trains
    warmup: float = 0.1
    weight_decay: float = 0.01
    amp: str | None = None
    resume: bool = False
    seed: int = 0
    device: str | None = None
    dev_queries: int = 100  # held out of the training queries for periodic nDCG@10
    eval_every: int | None = None  # steps; default once per epoch
    keep: str | None = None  # best (default): the head with the best held-out nDCG@10; last: the final one
    proj_dim: int | None = None  # maxsim: 128 by default; lite: Small-LITE projection when set
    lite_row_hidden: int = 2400
    lite_col_hidden: int = 384
    query_max_length: int = 32
    doc_max_length: int = 200
    encode_batch_size: int = 64
    cache_dir: str | None = None  # default OUT/cache
    progress: bool = True
    backend: str | None = None  # force the ops' backend ("reference": the eager step, for comparison)

    # -- resolution ----------------------------------------------------------------------------------------
    def check(self) -> "TrainConfig":
        """Validate every option and fill in defaults; raises ValueError/FileNotFoundError naming the option."""
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        data = Path(self.data)
        for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv"):
            if not (data / rel).is_file():
                raise FileNotFoundError(f"data: {data} is not a BEIR training folder: missing {rel}")
        device = torch.device(self.device) if self.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this torch has no CUDA (torch {torch.__version__})")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        self.device = str(device)
        if self.freeze_encoder is None:
            self.freeze_encoder = device.type == "cpu"
        if self.scorer == "dense" and self.freeze_encoder:
            raise ValueError("scorer dense with a frozen encoder has nothing to train (pooled dot products have no "
                             "parameters): fine-tune the encoder (--no-freeze-encoder) or train maxsim or lite")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise FileNotFoundError(f"model: {self.model} is not a local transformers model directory (no config.json)")
        for name in ("teacher", "candidates"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{name}: no such file: {value}")
        if self.teacher_model is not None and not (Path(self.teacher_model) / "config.json").is_file():
            raise FileNotFoundError(f"teacher_model: {self.teacher_model} is not a local model directory (no config.json)")
        if self.teacher and self.teacher_model:
            raise ValueError("give teacher scores as a file (teacher) or a model (teacher_model), not both")
        has_teacher = bool(self.teacher or self.teacher_model)
        given_loss = tuple(self.loss) if self.loss else None
        unknown = [name for name in given_loss or () if name not in LOSSES]
        if unknown:
            raise ValueError(f"loss: unknown {', '.join(unknown)}; choose from {', '.join(LOSSES)} (sum them with +)")
        reads_teacher = given_loss is None or any(name in TEACHER_LOSSES for name in given_loss)
        if self.self_distill is None:
            # lite distils itself by default, unless the losses asked for read no teacher scores
            self.self_distill = self.scorer == "lite" and not has_teacher and reads_teacher
        if self.self_distill and has_teacher:
            raise ValueError("self_distill distils the base encoder's MaxSim when there is no teacher; a teacher is given")
        if not reads_teacher and (self.self_distill or has_teacher):
            source = "self_distill" if self.self_distill else "teacher" if self.teacher else "teacher_model"
            raise ValueError(f"{source} with loss {'+'.join(given_loss)}: no loss of these reads teacher scores, so "
                             f"they would be computed and ignored; add one of {', '.join(TEACHER_LOSSES)} to the loss "
                             f"or drop {source}")
        self.loss = given_loss or (
            ("margin_mse",) if has_teacher else ("ce", "kl_div") if self.self_distill else ("ce",))
        self._refuse_ignored()
        needs = [name for name in self.loss if name in TEACHER_LOSSES]
        if needs and not has_teacher and not self.self_distill:
            raise ValueError(f"loss {', '.join(needs)} needs teacher scores (--teacher FILE, --teacher-model DIR or "
                             "--self-distill); without a teacher use ce or inbatch_ce, whose labels come from the qrels")
        for name, low in (("negatives", 2), ("batch_size", 1), ("accumulate", 1), ("mine_depth", 1),
                          ("query_max_length", 1), ("doc_max_length", 1), ("encode_batch_size", 1), ("dev_queries", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.negatives - 1 > self.mine_depth:
            raise ValueError(f"negatives {self.negatives} needs mine_depth >= {self.negatives - 1}, got {self.mine_depth}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        for name in ("steps", "epochs", "eval_every", "proj_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.steps is None and self.epochs is None:
            self.epochs = 10 if self.freeze_encoder else 1
        if self.lr is None:
            self.lr = 1e-3 if self.freeze_encoder else 2e-5
        # Filled in only where a loss reads it: check() runs again in train(), and must not meet a tau nobody gave.
        if self.tau is None and set(self.loss) & set(TAU_LOSSES):
            self.tau = 0.05 if self.scorer == "dense" else 1.0
        for name in ("lr", "tau"):
            value = getattr(self, name)
            if name == "tau" and value is None:
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.amp is not None:
            if self.amp not in AMP:
                raise ValueError(f"amp must be one of {', '.join(AMP)}, got {self.amp!r}")
            if self.amp == "fp16" and device.type == "cpu":
                raise ValueError("amp fp16 needs CUDA; on a CPU use amp bf16")
        if self.keep is not None and self.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.keep == "best" and self.dev_queries == 0:
            raise ValueError("keep best with dev_queries 0: the best head is chosen by held-out nDCG@10, and no query "
                             "is held out; hold some out (dev_queries >= 1) or keep last")
        if self.keep is None:
            self.keep = "best" if self.dev_queries else "last"
        if self.scorer == "maxsim" and self.proj_dim is None:
            self.proj_dim = 128
        if self.scorer == "dense" and self.proj_dim is not None:
            raise ValueError("proj_dim applies to maxsim (ColBERT projection) and lite (Small-LITE), not dense")
        self._check_out()
        return self

    def _refuse_ignored(self) -> None:
        """Options that this scorer and these losses never read, refused by name rather than dropped in
        silence (``self.loss`` resolved, defaults not yet filled in: ``None`` still means "not given")."""
        loss = "+".join(self.loss)
        if self.tau is not None and not set(self.loss) & set(TAU_LOSSES):
            raise ValueError(f"tau {self.tau} with loss {loss}: none of these losses has a temperature (only "
                             f"{', '.join(TAU_LOSSES)} do); drop tau or add one of them to the loss")
        if self.gamma0 != 0.0 and "rankdistil_b" not in self.loss:
            raise ValueError(f"gamma0 {self.gamma0} with loss {loss}: gamma0 is rankdistil_b's negative margin; add "
                             "rankdistil_b to the loss or drop gamma0")
        if self.scorer != "lite":
            fields = type(self).__dataclass_fields__
            for name in ("lite_row_hidden", "lite_col_hidden"):
                if getattr(self, name) != fields[name].default:
                    raise ValueError(f"{name} {getattr(self, name)} with scorer {self.scorer}: it sizes the LITE "
                                     "head's MLPs; use it with scorer lite or drop it")

    def run_entries(self) -> tuple[str, ...]:
        """What the run itself writes into ``out`` (the model's files come on top): the checkpoint, and the
        cache when no other cache_dir is given."""
        return (CHECKPOINT, CHECKPOINT + ".tmp") + (("cache",) if self.cache_dir is None else ())

    def _check_out(self) -> None:
        """``out`` is absent, empty, or a run or model fastrank wrote, and nothing the run would write there is
        a file of someone else's (:func:`fastrank.trained.check_model_dir`)."""
        from fastrank.trained import MANIFEST, MODEL_ENTRIES, RUN_MANIFEST, check_model_dir

        out = Path(self.out)
        # A run started before runs were marked has a checkpoint and no run manifest: --resume vouches for it.
        legacy = self.resume and (out / CHECKPOINT).is_file() and not (out / RUN_MANIFEST).exists()
        check_model_dir(self.out, (RUN_MANIFEST, *self.run_entries(), *MODEL_ENTRIES), "out",
                        adopt=self.run_entries() if legacy else ())
        if self.resume:
            if not (out / CHECKPOINT).is_file():
                raise FileNotFoundError(f"resume: {out / CHECKPOINT} does not exist (nothing to resume)")
        elif (out / CHECKPOINT).is_file() or (out / MANIFEST).is_file():
            raise ValueError(f"out: {out} already holds a training run; pass --resume to continue it or pick a new OUT")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
