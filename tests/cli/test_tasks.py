"""lm-eval tasks (prune_cli.stages.tasks): scored block by block with lm-eval's own metrics, equal to
lm-eval's HF model on the same model; the offline suite; task gates; the dense-baseline cache."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml

from prune_cli.core.gates import Gates, describe
from tests.cli.test_cli import SMALL, assert_one_line_error, run
from tests.conftest import requires_bundled

pytest.importorskip("lm_eval")

TASKS = ["--eval-tasks", "prune_cloze,prune_lastword", "--task-limit", "12"]


def _hflm_results(model, tokenizer, tasks, limit, tmp_path) -> dict:
    """lm-eval's own HF model (``HFLM(pretrained=model)``) on the offline tasks."""
    import os

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from prune_cli.stages.tasks import write_offline_suite

    os.environ["DISABLE_MULTIPROC"] = "1"
    folder = write_offline_suite(tmp_path / "suite")
    with contextlib.redirect_stdout(io.StringIO()):
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=1024), tasks=tasks, limit=limit,
            task_manager=TaskManager(include_path=str(folder), include_defaults=False), bootstrap_iters=0, log_samples=False)
    return {t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, float)} for t, m in out["results"].items()}


def _ours(folder, tasks, limit) -> dict:
    import torch

    from prune_cli.model.source import ModelSource
    from prune_cli.recipe.tasks import TaskSettings
    from prune_cli.stages.tasks import TaskRun
    from prune_cli.streaming.loader import open_model

    opened = open_model(ModelSource("folder", str(folder)), "auto", torch.device("cpu"), True)
    run_ = TaskRun(TaskSettings(tuple(tasks), limit=limit), opened.tokenizer, opened.config, None)
    stage = run_.stage("results")
    opened.driver.walk([stage])
    return run_.report()["results"]


def _assert_same_scores(ours: dict, reference: dict) -> None:
    for task, metrics in reference.items():
        for name, value in metrics.items():
            got = ours[task]["metrics"][name]
            if name.startswith("acc"):
                assert got == value, (task, name)  # the same choices and greedy answers
            else:
                assert got == pytest.approx(value, rel=1e-5), (task, name)


def test_streamed_scores_equal_lm_evals_own_hf_model(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = ["prune_cloze", "prune_lastword"]
    reference = _hflm_results(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
                              AutoTokenizer.from_pretrained(tiny_llama_dir), tasks, 16, tmp_path)
    _assert_same_scores(_ours(tiny_llama_dir, tasks, 16), reference)


@requires_bundled
@pytest.mark.slow  # ~50 s on 2 cores: the GGUF dequantised, saved, scored twice
def test_on_the_bundled_model_scores_equal_lm_evals_and_beat_chance(tmp_path):
    """SmolLM2-135M, dequantised from its GGUF and saved as a plain folder, scored by lm-eval's HF
    model and by prune-cli's walk: the same numbers, and the multiple-choice accuracy is above
    the 0.25 of guessing (the suite is a real signal, not noise)."""
    from prune_cli.model.source import resolve_source
    from prune_cli.model.structure import prepare_for_save
    from prune_cli.streaming.loader import load_model

    model, tokenizer = load_model(resolve_source(None), "float32", offline=True)
    prepare_for_save(model)
    folder = tmp_path / "smollm2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tasks = ["prune_cloze", "prune_lastword"]
    reference = _hflm_results(model, tokenizer, tasks, 30, tmp_path)
    ours = _ours(folder, tasks, 30)
    _assert_same_scores(ours, reference)
    assert ours["prune_cloze"]["metrics"]["acc_norm"] > 0.4


def test_compress_scores_dense_and_compressed_and_eval_of_the_export_agrees(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, *TASKS, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout)["tasks"]
    assert tasks["tasks"] == ["prune_cloze", "prune_lastword"] and tasks["limit"] == 12
    assert tasks["requests"] == 12 * 4 + 12  # four choices per cloze example, one word per last-word one
    for which in ("dense", "compressed"):
        assert set(tasks[which]) == {"prune_cloze", "prune_lastword"}
        assert {"acc", "acc_stderr", "acc_norm"} <= set(tasks[which]["prune_cloze"]["metrics"])
        assert tasks[which]["prune_cloze"]["samples"] == 12
    change = tasks["change"]["prune_cloze"]["acc"]
    assert change == pytest.approx(tasks["compressed"]["prune_cloze"]["metrics"]["acc"] - tasks["dense"]["prune_cloze"]["metrics"]["acc"])
    assert tasks["baseline_cached"] is False

    evaluated = run("eval", out, "--tasks", "prune_cloze,prune_lastword", "--limit", "12", "--no-ppl",
                    "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["ppl"] is None and report["evaluation"] is None
    for task, scores in tasks["compressed"].items():
        for name, value in scores["metrics"].items():
            assert report["tasks"]["results"][task]["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-12), (task, name)

    table = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, *TASKS, "-o", out, "--overwrite")
    assert table.exit_code == 0 and "lm-eval tasks" in table.stdout and "prune_lastword" in table.stdout


def test_activation_sparsity_checkpoints_are_scored_with_their_sparsifiers(tmp_path, tiny_llama_dir):
    out = tmp_path / "teal"
    result = run("compress", tiny_llama_dir, "--method", "teal", "--sparsity", "0.5", *SMALL, *TASKS, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    compressed = json.loads(result.stdout)["tasks"]["compressed"]
    evaluated = run("eval", out, "--tasks", "prune_cloze,prune_lastword", "--limit", "12", "--device", "cpu", "--json",
                    "--eval-windows", "2", "--eval-seqlen", "32")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["activation_sparsity"] == pytest.approx(0.5, abs=0.05)
    for task, scores in compressed.items():
        for name, value in scores["metrics"].items():
            assert report["tasks"]["results"][task]["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-12), (task, name)


def test_task_gates_fail_with_exit_3_and_the_checkpoint_written(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, *TASKS,
                 "--min-task-score", "prune_cloze=1.01", "--max-task-drop", "prune_cloze:acc_norm=1", "-o", out, "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    by_gate = {g["gate"]: g for g in report["gates"]}
    assert by_gate["min_task_score"]["passed"] is False and by_gate["min_task_score"]["metric"] == "acc"
    assert by_gate["min_task_score"]["by"] == pytest.approx(1.01 - by_gate["min_task_score"]["value"])
    assert by_gate["max_task_drop"]["passed"] is True and by_gate["max_task_drop"]["metric"] == "acc_norm"
    assert (out / "sparsity.json").is_file() and (out / "model.safetensors").is_file()
    assert "min_task_score prune_cloze:acc" in result.stderr


def test_task_gate_logic_on_every_direction():
    tasks = {"dense": {"t": {"metrics": {"acc": 0.60, "perplexity": 10.0}}},
             "compressed": {"t": {"metrics": {"acc": 0.52, "perplexity": 14.0}}}}
    gates = Gates(min_task_score={"t": 0.5, "t:perplexity": 12.0}, max_task_drop={"t": 0.05, "t:perplexity": 5.0})
    results = {(r["gate"], r["metric"]): r for r in gates.check({}, tasks)}
    assert results[("min_task_score", "acc")]["passed"] is True  # 0.52 >= 0.5
    assert results[("min_task_score", "perplexity")]["passed"] is False  # lower is better: 14 > 12
    assert results[("max_task_drop", "acc")]["value"] == pytest.approx(0.08)
    assert results[("max_task_drop", "acc")]["passed"] is False
    assert results[("max_task_drop", "perplexity")]["value"] == pytest.approx(4.0)  # a rise of 4 <= 5
    assert describe(results[("max_task_drop", "acc")]) == "max_task_drop t:acc: 0.08 > 0.05 (by 0.03)"
    missing = Gates(min_task_score={"t:f1": 0.1}).check({}, tasks)[0]
    assert missing["passed"] is False and missing["value"] is None


def test_bad_task_input_is_one_line_before_any_work(tmp_path, tiny_llama_dir):
    from tests.cli.test_cli import SMALL as PLAIN

    unknown = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *PLAIN,
                  "--eval-tasks", "prune_clozee", "-o", tmp_path / "a")
    assert_one_line_error(unknown)
    assert "unknown task 'prune_clozee'" in unknown.stderr and "prune_cloze" in unknown.stderr
    assert not (tmp_path / "a").exists()

    ungated = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *PLAIN,
                  "--max-task-drop", "prune_cloze=0.1", "-o", tmp_path / "b")
    assert_one_line_error(ungated)
    assert "a gate names task 'prune_cloze', which is not scored" in ungated.stderr

    bad = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *PLAIN, "--eval-tasks", "prune_cloze",
              "--min-task-score", "prune_cloze", "-o", tmp_path / "c")
    assert bad.exit_code == 2 and "TASK[:METRIC]=NUMBER" in bad.output

    folder = tmp_path / "yaml"
    folder.mkdir()
    data = tmp_path / "gen.jsonl"
    data.write_text('{"q": "Say hi", "a": "hi"}\n')
    (folder / "gen.yaml").write_text(yaml.safe_dump({
        "task": "my_generation", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
        "metric_list": [{"metric": "exact_match"}]}))
    generation = run("eval", tiny_llama_dir, "--tasks", "my_generation", "--include-path", folder, "--no-ppl", "--device", "cpu")
    assert_one_line_error(generation)
    assert "a task that generates text is not scored" in generation.stderr


def test_the_dense_baseline_is_cached_and_keyed_by_what_it_depends_on(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PRUNE_CLI_BASELINE_CACHE", "1")
    monkeypatch.setenv("PRUNE_CLI_CACHE", str(tmp_path / "cache"))
    args = ["compress", tiny_llama_dir, *SMALL, *TASKS, "--json"]
    first = run(*args, "--method", "wanda", "--sparsity", "0.5", "-o", tmp_path / "a")
    second = run(*args, "--method", "magnitude", "--sparsity", "0.6", "-o", tmp_path / "b")  # another method: same dense
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["evaluation"]["dense_cached"] is False and b["evaluation"]["dense_cached"] is True
    assert b["tasks"]["baseline_cached"] is True
    assert b["ppl"]["dense"] == a["ppl"]["dense"] and b["tasks"]["dense"] == a["tasks"]["dense"]
    assert len(list((tmp_path / "cache" / "baselines").glob("*.json"))) == 1

    other_windows = run(*args[:2], *[("3" if x == "2" else x) for x in SMALL], *TASKS, "--json", "--method", "wanda",
                        "--sparsity", "0.5", "-o", tmp_path / "c")
    assert json.loads(other_windows.stdout)["evaluation"]["dense_cached"] is False
    off = run(*args, "--method", "wanda", "--sparsity", "0.5", "--no-baseline-cache", "-o", tmp_path / "d")
    report = json.loads(off.stdout)
    assert report["evaluation"]["dense_cached"] is False and report["ppl"]["dense"] == a["ppl"]["dense"]
