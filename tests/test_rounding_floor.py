"""scripts/rounding_floor.py's perturbation: run 0 is the recipe's own head, every other run moves each weight
by a relative 2**-23 or not at all (at most two units in the last place), differently per run, and the same
way every time."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rounding_floor.py"


def _perturbed():
    spec = importlib.util.spec_from_file_location("rounding_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.perturbed


def _head():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30))


def test_run_zero_is_the_unperturbed_head():
    base, same = _head(), _perturbed()(_head, 0)()
    for a, b in zip(base.parameters(), same.parameters()):
        assert torch.equal(a, b)


def test_other_runs_move_weights_by_at_most_two_ulp_differently_per_run_and_reproducibly():
    base = dict(_head().named_parameters())
    runs = [dict(_perturbed()(_head, r)().named_parameters()) for r in (1, 2, 1)]
    for name, p in base.items():
        ulp = torch.nextafter(p.abs(), torch.tensor(float("inf"))) - p.abs()
        for run in runs:
            assert ((run[name] - p).abs() <= 2 * ulp).all(), name
    moved = base["0.weight"] != runs[0]["0.weight"]
    assert 0.5 < moved.float().mean() < 0.8  # two thirds of the weights move, one third stays
    assert not torch.equal(runs[0]["0.weight"], runs[1]["0.weight"])
    assert torch.equal(runs[0]["0.weight"], runs[2]["0.weight"])
    assert torch.equal(runs[0]["1.bias"], base["1.bias"])  # zeros stay zero
    assert not torch.equal(runs[0]["1.weight"], base["1.weight"])  # LayerNorm's ones move
