"""Bad recipes, options and calibration text: each is refused early with exit 2 and one line
naming the entry, the option or the file (never an internal error, never silently ignored).

The cases run through the real CLI on the tiny model (see tests/cli/test_bad_input.py for the
helpers) and check that nothing was written next to ``--output``.
"""

from __future__ import annotations

import json

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
