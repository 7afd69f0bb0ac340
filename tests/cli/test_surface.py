"""The command line as a user meets it: --version, completion, `methods`, help at 80 columns,
option names shared by compress / eval / sweep."""

from __future__ import annotations

import dataclasses
import re

import click
import pytest
import typer
from typer.testing import CliRunner

from prune_cli.activation import ACTIVATION_METHODS
from prune_cli.cli import app
from prune_cli.methods import WEIGHT_METHODS
from prune_cli.methods.catalog import method_summary

runner = CliRunner()


def _command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


def test_version_names_the_distribution_and_libraries():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert re.match(r"prune-cli \d+\.\d+\.\d+ \(llm-prune-cli; torch \S+, transformers \S+, Python \S+\)", result.stdout)


def test_shell_completion_is_offered():
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_methods_lists_every_method_with_its_options_and_a_real_description():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(text.split())  # wrapped lines joined again
    for registry in (WEIGHT_METHODS, ACTIVATION_METHODS):
        for name in registry:
            cls = registry.get(name)
            summary = method_summary(cls)
            assert summary != "(no description)" and not summary.startswith(f"{cls.__name__}("), name
            assert f"{name} {summary}" in flat
            for field in dataclasses.fields(cls):
                assert f"{field.name}={field.default!r}" in flat, (name, field.name)


@pytest.mark.parametrize("command", ["compress", "eval", "sweep", "verify"])
def test_help_at_80_columns_keeps_every_option_name_whole(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for param in _command(command).params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}([\s,=/]|$)", result.stdout, re.M), name


def test_method_help_names_every_registered_method():
    help_text = " ".join(runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "200"}).stdout.split())
    for name in [*WEIGHT_METHODS, *ACTIVATION_METHODS]:
        assert name in help_text.split("--method")[1].split("--base")[0], name


@pytest.mark.parametrize("command", ["compress", "eval", "sweep"])
def test_task_options_have_the_same_names_in_every_command(command):
    names = {n for p in _command(command).params for n in p.opts}
    assert {"--tasks", "--eval-tasks", "--task-limit", "--limit"} <= names


def test_owl_m_auto_as_its_help_says(tmp_path, tiny_llama_dir):
    args = ["compress", str(tiny_llama_dir), "--method", "wanda", "--sparsity", "0.5", "--layerwise", "owl",
            "--calib-samples", "2", "--seqlen", "16", "--no-eval", "--device", "cpu", "--dry-run"]
    ok = runner.invoke(app, [*args, "--owl-m", "auto", "--owl-lambda", "0.08"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, [*args, "--owl-m", "often"])
    assert bad.exit_code == 2 and "neither 'auto' nor a number" in bad.output
