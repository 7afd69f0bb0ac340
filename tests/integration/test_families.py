"""Every common decoder family through compress -> export -> plain transformers -> eval, on tiny
random models built in-process (tests/tiny_models.py).

Random weights say nothing about quality; what they do prove is that prune-cli computes what
transformers computes: the dense perplexity of the streamed walk (blocks read one at a time, the
block kwargs such as Gemma 3's two rotary embeddings and sliding-window masks passed through)
equals a direct forward of the whole model, and the exported checkpoint, loaded by plain
transformers, scores exactly the reported compressed perplexity with the reported zeros.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.test_cli import run
from tests.tiny_models import save_tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "opt", "gpt_neox", "gpt2"]
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json"]
METHODS = {
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "teal": ["--method", "teal", "--sparsity", "0.5"],
}
_MODELS: dict[str, object] = {}


@pytest.fixture
def family_dir(request, tmp_path_factory):
    family = request.param
    if family not in _MODELS:  # one model per family for the whole session; Gemma's tokenizer adds BOS
        _MODELS[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), adds_bos=family == "gemma3")
    return family, _MODELS[family]


def _direct_ppl(model, tokenizer, bos: bool) -> float:
    """Perplexity of a plain forward on the first 2 evaluation windows of 32 tokens."""
    from prune_cli.calibrators.sources import bundled_text

    body = 31 if bos else 32
    ids = torch.tensor(tokenizer(bundled_text("evaluation").text, add_special_tokens=False)["input_ids"][: 2 * body])
    windows = ids.reshape(2, body)
    if bos:
        windows = torch.cat([torch.full((2, 1), tokenizer.bos_token_id), windows], dim=1)
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return float(torch.exp(nll))


@pytest.mark.parametrize("family_dir", FAMILIES, indirect=True)
@pytest.mark.parametrize("method", list(METHODS))
def test_family_compress_export_reload_eval(tmp_path, family_dir, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, model_dir = family_dir
    out = tmp_path / "out"
    result = run("compress", model_dir, *METHODS[method], *SMALL, "-o", out)
    if family == "gpt2" and method == "teal":  # activation sparsity on Conv1D: refused up front
        assert result.exit_code == 2 and "activation sparsity on Conv1D layers" in result.stderr
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["streamed"] is True
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos = report["calibration"]["bos"]
    assert bos is (family == "gemma3")
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert report["ppl"]["dense"] == pytest.approx(_direct_ppl(dense, tokenizer, bos), rel=1e-4)

    if method == "teal":
        assert report["activation"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.05)
    else:
        exported = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no prune-cli
        assert report["ppl"]["compressed"] == pytest.approx(_direct_ppl(exported, tokenizer, bos), rel=1e-4)
        assert report["layers"] and report["sparsity"] == pytest.approx(0.5)
        for layer in report["layers"]:
            weight = exported.get_submodule(layer["name"]).weight
            if family == "gpt2":  # Conv1D stores (in, out): the export is a plain GPT-2 checkpoint
                assert type(exported.get_submodule(layer["name"])).__name__ == "Conv1D"
                weight = weight.t()
            assert (weight == 0).float().mean().item() == pytest.approx(layer["achieved_sparsity"], abs=1e-6)
            if method == "wanda-2:4":  # N:M along the input dimension, also for fused qkv / gate_up
                groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
                assert (groups <= 2).all(), layer["name"]
        unchanged = {n for n, _ in dense.named_parameters()} - {l["name"] + ".weight" for l in report["layers"]}
        dense_state, exported_state = dense.state_dict(), exported.state_dict()
        for name in unchanged:  # embeddings, norms, biases, lm_head: exactly the source's
            assert torch.equal(dense_state[name], exported_state[name]), name

    evaluated = run("eval", out, "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(report["ppl"]["compressed"], rel=1e-6)


def test_fused_projections_are_pruned_as_one_linear(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value: one Linear each, its N:M
    groups along the input dimension (checked above); here: they are targets, by name."""
    names = {}
    for family in ("phi3", "gpt_neox"):
        model_dir = save_tiny_model(family, tmp_path / family)
        result = run("compress", model_dir, *METHODS["wanda"], *SMALL, "--no-eval", "-o", tmp_path / f"out-{family}")
        assert result.exit_code == 0, result.output
        names[family] = {l["name"].rsplit(".", 2)[-2] + "." + l["name"].rsplit(".", 1)[-1] for l in json.loads(result.stdout)["layers"]}
    assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= names["phi3"]
    assert {"attention.query_key_value", "mlp.dense_h_to_4h"} <= names["gpt_neox"]
