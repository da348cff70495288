"""Every command's parser, walked: the options all `bench` subcommands share mean one thing, and every
option's --help says what it does and what its default is."""
from __future__ import annotations

import argparse
import json
import re

import pytest

from fastrank.cli import build_parser, main

SHARED = ("--quick", "--device", "--json", "--out")


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("fastrank",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def _options(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


PARSERS = dict(_walk(build_parser()))
BENCH = {path[-1]: p for path, p in PARSERS.items() if len(path) == 3 and path[1] == "bench"}


def test_the_walk_finds_every_bench_subcommand():
    assert set(BENCH) == {"maxsim", "packed", "rerank", "all", "lite", "losses", "index", "kernels", "gpu",
                          "train-step"}


@pytest.mark.parametrize("op", sorted(BENCH))
def test_shared_bench_options_mean_one_thing(op):
    opts = _options(BENCH[op])
    assert set(SHARED) <= set(opts), f"bench {op} lacks {set(SHARED) - set(opts)}"
    quick, device, as_json, out = (opts[s] for s in SHARED)
    assert quick.nargs == 0 and quick.default is False and quick.help.startswith("a quick look: ")
    # --device takes cpu, cuda or cuda:N (checked with the flag's name when the command runs), no fixed choices
    assert device.nargs is None and device.default is None and device.choices is None
    assert device.help.startswith("where to measure: cpu, cuda or cuda:N (default: ")
    # --json [FILE]: a file, or stdout instead of the tables without one
    assert (as_json.nargs, as_json.const, as_json.default, as_json.metavar) == ("?", "-", None, "FILE")
    assert "to FILE, or to stdout instead of the tables without FILE" in as_json.help
    assert (out.nargs, out.default, out.metavar) == (None, None, "DIR") and " into DIR" in out.help
    args = BENCH[op].parse_args(["--json"])
    assert args.json == "-"


def _help_lines(parser) -> dict[str, str]:
    """Each option's help as --help prints it (the formatter's default appended), keyed by its longest flag."""
    formatter = parser._get_formatter()
    return {max(a.option_strings, key=len): formatter._expand_help(a) for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}


@pytest.mark.parametrize("path", sorted(PARSERS), ids=" ".join)
def test_every_option_says_what_it_does_and_its_default(path):
    parser = PARSERS[path]
    actions = {max(a.option_strings, key=len): a for a in parser._actions if a.option_strings}
    for flag, text in _help_lines(parser).items():
        action = actions[flag]
        assert text.strip(), f"{' '.join(path)} {flag}: no help"
        if action.nargs == 0:  # a flag: off unless given
            continue
        assert "default" in text, f"{' '.join(path)} {flag}: --help does not say its default: {text!r}"
        if action.default is not None and action.default is not False:
            defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
            numbers = {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)}
            assert all(str(d) in text or (isinstance(d, (int, float)) and float(d) in numbers) for d in defaults), (
                f"{' '.join(path)} {flag}: default {action.default!r} not in its help {text!r}")


def test_help_prints_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "rerank", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "texts or pairs per forward pass (default: 64)" in text
    assert "--json [FILE]" in text and "--out DIR" in text


def test_json_without_file_is_json_on_stdout_for_a_bench_subcommand(capsys):
    assert main(["bench", "losses", "--tiny", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["command"].startswith("fastrank bench losses") and res["rows"]


def test_device_is_checked_by_its_flag_in_every_bench_subcommand(capsys):
    for op in sorted(BENCH):
        code = main(["bench", op, "--device", "tpu", "--list"] if op == "kernels" else ["bench", op, "--device", "tpu"])
        err = capsys.readouterr().err
        assert code == 2 and "--device tpu" in err, (op, err)
