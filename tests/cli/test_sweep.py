"""``prune-cli sweep``: a grid of methods x sparsities, the dense model scored once, a table,
--json, a PNG plot, optional checkpoints."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import SMALL, assert_one_line_error, run


def test_sweep_scores_the_dense_model_once_and_plots_the_grid(tmp_path, tiny_llama_dir):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot" / "sweep.png"
    result = run("sweep", tiny_llama_dir, "--methods", "wanda,magnitude", "--sparsities", "0.3,0.6", "--patterns", "2:4",
                 *SMALL, "--plot", png, "--keep-checkpoints", tmp_path / "ckpt", "--no-baseline-cache", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "prune-cli/sweep-report"
    grid = [(r["method"], r["pattern"], r["target_sparsity"]) for r in report["runs"]]
    assert grid == [("wanda", "unstructured", 0.3), ("wanda", "unstructured", 0.6), ("magnitude", "unstructured", 0.3),
                    ("magnitude", "unstructured", 0.6), ("wanda", "2:4", 0.5), ("magnitude", "2:4", 0.5)]
    assert [r["dense_cached"] for r in report["runs"]] == [False] + [True] * 5  # one dense evaluation for the sweep
    for r in report["runs"]:
        assert r["sparsity"] == pytest.approx(r["target_sparsity"], abs=0.01)
        assert r["ppl"] > 1 and r["ppl_ratio"] == pytest.approx(r["ppl"] / report["dense"]["ppl"])
        saved = json.loads((tmp_path / "ckpt" / r["output"].split("/")[-1] / "sparsity.json").read_text())
        assert saved["ppl"]["compressed"] == r["ppl"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert report["plot"] == str(png)
    assert not list((tmp_path / "ckpt").glob(".*partial*"))

    table = run("sweep", tiny_llama_dir, "--methods", "wanda", "--sparsities", "0.5", *SMALL)
    assert table.exit_code == 0, table.output
    assert "prune-cli sweep" in table.stdout and "wanda" in table.stdout


def test_sweep_refuses_a_bad_grid_before_any_run(tmp_path, tiny_llama_dir):
    from tests.cli.test_cli import SMALL as PLAIN

    for args, message in ((["--methods", "wanda", "--sparsities", "0.5,1.5"], "sweep sparsities must be in (0, 1)"),
                          (["--methods", "wanda"], "sweep needs --sparsities or --patterns"),
                          (["--methods", "wandaa", "--sparsities", "0.5"], "wandaa")):
        result = run("sweep", tiny_llama_dir, *args, *PLAIN)
        assert_one_line_error(result)
        assert message in result.stderr
    bad = run("sweep", tiny_llama_dir, "--methods", "wanda", "--sparsities", "half", *PLAIN)
    assert bad.exit_code == 2 and "expected numbers" in bad.output
