"""`fastrank bench index --scale` end to end at toy sizes: every row's fields, peak memory taken from the
child processes, the resume check, the fits, and its option checks. (Its figures at toy sizes mean nothing.)"""
from __future__ import annotations

import json

from fastrank.bench.index_scale import SyntheticCorpus, sizes_for
from fastrank.cli import main


def test_scale_rows_fits_and_resume(tmp_path, capsys):
    rc = main(["bench", "index", "--scale", "--max-tokens", "20000", "--token-dtypes", "residual2",
               "--device", "cpu", "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert [r["tokens"] for r in res["rows"]] == [2000, 20000]
    for r in res["rows"]:
        assert set(r) >= {"tokens", "dtype", "build_s", "peak_rss_bytes", "bytes_per_token", "load_s", "qps",
                          "recall_at_10", "machine"}
        assert r["dtype"] == "residual2" and 0 <= r["recall_at_10"] <= 1 and r["qps"] > 0
        assert set(r["stage_ms"]) == {"centroids", "candidates", "exact"} and min(r["stage_ms"].values()) > 0
        assert r["search_queries"] >= r["queries"]
        # A child's own peak: more than the interpreter and torch, far less than the machine.
        assert 100 * 2**20 < r["peak_rss_bytes"] < 8 * 2**30 and r["search_peak_rss_bytes"] > 100 * 2**20
        # 16 bytes of residuals and a 2-byte code per token at H = 128 and 2 bits, plus lists and offsets.
        assert 18 <= r["bytes_per_token"] <= 80
    assert [r["kill_at"] for r in res["resume"]] == [0.25, 0.5]
    for r in res["resume"]:
        assert r["identical"] and r["tokens"] == 20000 and r["stage_at_kill"]
    assert res["fits"][0]["dtype"] == "residual2" and res["fits"][0]["build_exponent"] is not None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "recall@10" in report and "Resume:" in report and "MS MARCO" in report and "candidates ms" in report


def test_scale_options_are_checked(capsys):
    assert main(["bench", "index", "--max-tokens", "5000"]) == 2
    assert "--max-tokens apply to --scale only" in capsys.readouterr().err
    assert main(["bench", "index", "--scale", "--token-dtypes", "int4"]) == 2
    assert "--token-dtypes: expected a comma-separated subset" in capsys.readouterr().err
    assert main(["bench", "index", "--scale", "--max-tokens", "500"]) == 2
    assert "expected at least 10000" in capsys.readouterr().err


def test_the_synthetic_corpus_is_deterministic_and_skips_whole_chunks():
    a = list(SyntheticCorpus(30000, dim=16, seed=2).chunks())
    b = list(SyntheticCorpus(30000, dim=16, seed=2).chunks())
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))
    assert sum(int(o[-1]) for _, o in a) == 30000
    skipped = list(SyntheticCorpus(30000, dim=16, seed=2).chunks(skip_documents=len(a[0][1]) - 1))
    assert len(skipped) == len(a) - 1 and (skipped[0][0] == a[1][0]).all()
    assert sizes_for(100_000_000) == [1_000_000, 10_000_000, 100_000_000] and sizes_for(20000) == [2000, 20000]
