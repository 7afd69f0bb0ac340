"""Bad recipes, options and calibration text: each is refused early with exit 2 and one line
naming the entry, the option or the file (never an internal error, never silently ignored).

The cases run through the real CLI on the tiny model (see tests/cli/test_bad_input.py for the
helpers) and check that nothing was written next to ``--output``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_bad_input import FAST, fingerprint, one_line_error, run

WANDA = ["--method", "wanda", "--sparsity", "0.5"]


def _compress(tmp_path, tiny_llama_dir, *args, as_json=False, dry_run=False):
    """``compress`` of the tiny model into ``tmp_path/out`` (or ``--dry-run``); the folder is unchanged."""
    before = fingerprint(tmp_path)
    extra = (["--json"] if as_json else []) + (["--dry-run"] if dry_run else ["-o", tmp_path / "out"])
    result = run("compress", tiny_llama_dir, *args, *FAST, *extra)
    assert fingerprint(tmp_path) == before
    return result


# ----------------------------------------------------------------------------- -O KEY=VALUE


@pytest.mark.parametrize("value", ["scope=[", "scope={", 'scope="row', "scope='row", "scope=!!python/object:os.system",
                                   "scope=@row", "scope=x: y: z"])
def test_unreadable_option_value_is_a_usage_error(tmp_path, tiny_llama_dir, value):
    for as_json in (False, True):
        result = _compress(tmp_path, tiny_llama_dir, *WANDA, "-O", value, as_json=as_json)
        data = one_line_error(result, 2, "--option", as_json=as_json)
        line = data["error"]["message"] if as_json else result.stderr.splitlines()[0]
        assert "'scope'" in line and repr(value.partition("=")[2]) in line


@pytest.mark.parametrize("value", ["scope", "=row", " =row"])
def test_option_without_key_or_value_is_a_usage_error(tmp_path, tiny_llama_dir, value):
    one_line_error(_compress(tmp_path, tiny_llama_dir, *WANDA, "-O", value), 2, "expected KEY=VALUE")


def test_option_with_two_equals_signs_names_the_unknown_option(tmp_path, tiny_llama_dir):
    one_line_error(_compress(tmp_path, tiny_llama_dir, *WANDA, "-O", "a=b=c"), 2, "unknown option 'a'")


# ----------------------------------------------------------------------------- calibration text


@pytest.mark.parametrize("flag", ["--calib-text", "--eval-text"])
def test_jsonl_text_that_is_not_a_string_names_file_line_and_type(tmp_path, tiny_llama_dir, flag):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a sentence " * 50}) + "\n" + json.dumps({"text": 5}) + "\n")
    before = fingerprint(tmp_path)
    result = run("compress", tiny_llama_dir, *WANDA, "--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1",
                 "--eval-seqlen", "16", "--device", "cpu", flag, rows, "-o", tmp_path / "out", "--json")
    data = one_line_error(result, 2, f"{rows}:2: field 'text' is an integer", as_json=True)
    assert data["error"]["type"] == "BadInputError"
    assert fingerprint(tmp_path) == before


# ----------------------------------------------------------------------------- every selection must select


def _recipe(tmp_path, **body) -> "Path":
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **body}))
    return path


NOTHING = {
    "exclude matching no Linear": (
        {"targets": {"exclude": ["down_projj"]}}, "targets.exclude[0] 'down_projj' excludes nothing"),
    "exclude outside the includes": (
        {"targets": {"include": [r"mlp\."], "exclude": ["q_proj"]}}, "targets.exclude[0] 'q_proj' excludes nothing"),
    "one include of two matching nothing": (
        {"targets": {"include": ["mlp", "atention"]}}, "targets.include[1] 'atention' matches no Linear"),
    "override block that does not exist": (
        {"overrides": [{"blocks": [0, 7], "sparsity": 0.3}]}, "overrides[0].blocks: the model has no block 7"),
    "override match selecting nothing": (
        {"overrides": [{"blocks": [0], "sparsity": 0.3}, {"match": r"mlp\.dwn_proj", "sparsity": 0.4}]},
        "overrides[1] (match 'mlp\\\\.dwn_proj') selects no targeted Linear"),
    "override of an excluded Linear": (
        {"targets": {"exclude": ["down_proj"]}, "overrides": [{"blocks": [1], "match": "down_proj", "sparsity": 0.4}]},
        "overrides[0] (blocks [1], match 'down_proj') selects no targeted Linear"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", list(NOTHING))
def test_a_selection_that_selects_nothing_is_refused(tmp_path, tiny_llama_dir, case, dry_run):
    body, needle = NOTHING[case]
    recipe = _recipe(tmp_path, method="wanda", sparsity=0.5, **body)
    data = one_line_error(_compress(tmp_path, tiny_llama_dir, "-r", recipe, as_json=True, dry_run=dry_run), 2, needle,
                          as_json=True)
    assert data["error"]["type"] == "RecipeError"


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_activation_targets_that_select_nothing_are_refused(tmp_path, tiny_llama_dir, dry_run):
    recipe = _recipe(tmp_path, method="teal", sparsity=0.5, targets={"include": ["mlp"], "exclude": ["o_proj"]})
    one_line_error(_compress(tmp_path, tiny_llama_dir, "-r", recipe, dry_run=dry_run), 2,
                   "targets.exclude[0] 'o_proj' excludes nothing")


def test_re_prefix_marks_a_regular_expression(tmp_path, tiny_llama_dir):
    """``re:`` is read as the regular expression after it (patterns are regular expressions),
    never as the literal text ``re:...`` (which would match no name)."""
    plans = []
    for prefix in ("", "re:"):
        recipe = _recipe(tmp_path, method="wanda", sparsity=0.5,
                         targets={"include": [prefix + r"mlp\."], "exclude": [prefix + "down_proj$"]},
                         overrides=[{"match": prefix + "up_proj$", "sparsity": 0.3}])
        result = _compress(tmp_path, tiny_llama_dir, "-r", recipe, as_json=True, dry_run=True)
        assert result.exit_code == 0, result.output
        plans.append(json.loads(result.stdout)["layers"])
    assert plans[0] == plans[1]
    assert {(layer["module"].split(".", 3)[-1], layer["sparsity"]) for layer in plans[0]} == {
        ("mlp.gate_proj", 0.5), ("mlp.up_proj", 0.3)}


# ----------------------------------------------------------------------------- options that would select nothing


@pytest.mark.parametrize("case", ["column-with-txt", "column-with-bundled", "split-without-dataset", "chat-with-txt"])
def test_calibration_selectors_without_anything_to_select_are_refused(tmp_path, tiny_llama_dir, case):
    """--calib-column, --calib-split and --calib-chat-template pick within .jsonl rows or a
    dataset; where the calibration text has neither they were ignored without a word."""
    txt = tmp_path / "a.txt"
    txt.write_text("some words " * 200)
    args, needle = {
        "column-with-txt": (["--calib-text", txt, "--calib-column", "body"], "calibration.column 'body'"),
        "column-with-bundled": (["--calib-column", "body"], "calibration.column 'body'"),
        "split-without-dataset": (["--calib-split", "test"], "calibration.split 'test'"),
        "chat-with-txt": (["--calib-text", txt, "--calib-chat-template"], "calibration.chat_template"),
    }[case]
    for dry_run in (False, True):
        one_line_error(_compress(tmp_path, tiny_llama_dir, *WANDA, *args, dry_run=dry_run), 2, needle)


def test_jsonl_text_with_a_lone_surrogate_is_refused(tmp_path, tiny_llama_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": "word " * 40 + ("\ud800" if i == 3 else "")}) for i in range(6)))
    one_line_error(_compress(tmp_path, tiny_llama_dir, *WANDA, "--calib-text", rows), 2,
                   f"{rows}:4: field 'text' is not valid text (a lone surrogate")


def test_a_text_file_read_twice_is_refused(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some words " * 400)
    one_line_error(_compress(tmp_path, tiny_llama_dir, *WANDA, "--calib-text", "a.txt", "--calib-text", tmp_path / "a.txt"),
                   2, f"calibration.text lists {tmp_path / 'a.txt'} twice (also as a.txt)")
    before = fingerprint(tmp_path)
    result = run("compress", tiny_llama_dir, *WANDA, "--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1",
                 "--eval-seqlen", "16", "--device", "cpu", "--calib-text", "a.txt", "--eval-text", tmp_path / "a.txt",
                 "-o", tmp_path / "out")
    one_line_error(result, 2, "is both calibration and evaluation text")
    assert fingerprint(tmp_path) == before
