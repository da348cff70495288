"""Training a student re-ranker with fastrank's fused scorers and losses: ``fastrank train`` on the command line,
:func:`train` from Python. A small loop, not a framework: :mod:`fastrank.train.loop` reads as the recipe."""
from fastrank.train.config import LOSSES, SCORERS, TrainConfig
from fastrank.train.loop import TrainResult, train

__all__ = ["LOSSES", "SCORERS", "TrainConfig", "TrainResult", "train"]
