"""Quality gates: a failed gate still writes the checkpoint and report, says which gate failed by
how much, and exits 3 (not 2, not 1)."""

import json

import pytest
import yaml

from tests.cli.test_cli import SMALL, assert_one_line_error, run

ARGS = ["--method", "magnitude", "--sparsity", "0.7", *SMALL]


@pytest.fixture(scope="module")
def measured_ratio(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ratio") / "out"
    result = run("compress", tiny_llama_dir, *ARGS, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gates"] is None
    return report["ppl"]["ratio"]


def test_a_failed_gate_exits_3_with_the_checkpoint_written(tmp_path, tiny_llama_dir, measured_ratio):
    limit = measured_ratio * 0.999
    out = tmp_path / "out"
    result = run("compress", tiny_llama_dir, *ARGS, "-o", out, "--json", "--max-ppl-ratio", limit)
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)  # the report, not an error object
    (gate,) = report["gates"]
    assert gate["gate"] == "max_ppl_ratio" and gate["passed"] is False
    assert gate["value"] == pytest.approx(measured_ratio) and gate["by"] == pytest.approx(measured_ratio - limit)
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "sparsity.json").read_text())["gates"] == report["gates"]
    assert "gate failed: max_ppl_ratio:" in result.stderr and f"by {gate['by']:.4g}" in result.stderr


def test_a_passed_gate_exits_0(tmp_path, tiny_llama_dir, measured_ratio):
    result = run("compress", tiny_llama_dir, *ARGS, "-o", tmp_path / "out", "--json", "--max-ppl-ratio", measured_ratio * 1.001)
    assert result.exit_code == 0, result.output
    (gate,) = json.loads(result.stdout)["gates"]
    assert gate["passed"] is True and gate["by"] < 0
    assert "gate failed" not in result.stderr


def test_gate_in_a_recipe_and_the_table_output(tmp_path, tiny_llama_dir, measured_ratio):
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "method": "magnitude", "sparsity": 0.7,
                                      "gates": {"max_ppl_ratio": measured_ratio * 0.999}}))
    result = run("compress", tiny_llama_dir, "--recipe", recipe, *SMALL, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "gate failed: max_ppl_ratio" in result.stderr
    saved = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert saved["recipe"]["gates"] == {"max_ppl_ratio": pytest.approx(measured_ratio * 0.999), "min_task_score": {},
                                        "max_task_drop": {}}


@pytest.mark.parametrize("extra,message", [
    (["--no-eval", "--max-ppl-ratio", "1.5"], "a quality gate needs the evaluation"),
    (["--max-ppl-ratio", "0"], "gates.max_ppl_ratio must be a positive number"),
    (["--max-ppl-ratio", "nan"], "gates.max_ppl_ratio must be a positive number"),
])
def test_bad_gates_are_usage_errors(tmp_path, tiny_llama_dir, extra, message):
    result = run("compress", tiny_llama_dir, *ARGS, "-o", tmp_path / "out", *extra)
    assert_one_line_error(result)
    assert message in result.stderr and not (tmp_path / "out").exists()
