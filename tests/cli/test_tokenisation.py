"""Tokenisation conventions. BOS: windows start with the BOS token exactly when the model's
tokenizer adds one (or as --bos says), the report records it, and the BOS is an input, never a
prediction target. Chat: --calib-chat-template renders .jsonl rows with messages by the
tokenizer's own chat template."""

import json

import pytest
import torch

from tests.cli.test_cli import SMALL, assert_one_line_error, run
from tests.tiny_models import save_tiny_model

EVAL = ["--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def bos_llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-bos"), adds_bos=True)


def _compress(model_dir, out, *extra):
    result = run("compress", model_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_auto_follows_a_tokenizer_that_adds_bos(tmp_path, bos_llama_dir):
    auto = _compress(bos_llama_dir, tmp_path / "auto")
    never = _compress(bos_llama_dir, tmp_path / "never", "--bos", "never")
    assert auto["calibration"]["bos"] is True and auto["evaluation"]["bos"] is True
    assert never["calibration"]["bos"] is False and never["evaluation"]["bos"] is False
    assert auto["recipe"]["bos"] == "auto" and never["recipe"]["bos"] == "never"
    assert auto["calibration"]["tokens_sha256"] != never["calibration"]["tokens_sha256"]
    # the BOS is never a target: both score seqlen - 1 predictions per window
    assert auto["evaluation"]["dense"]["tokens"] == never["evaluation"]["dense"]["tokens"] == 2 * 31
    assert auto["ppl"]["dense"] != never["ppl"]["dense"]


def test_dense_perplexity_is_plain_transformers_on_bos_windows(tmp_path, bos_llama_dir):
    """The reported dense perplexity equals a direct forward of the model on windows that start
    with the tokenizer's BOS id and hold 31 text tokens each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prune_cli.calibrators.sources import bundled_text

    report = _compress(bos_llama_dir, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(bos_llama_dir)
    text_ids = tokenizer(bundled_text("evaluation").text, add_special_tokens=False)["input_ids"][: 2 * 31]
    windows = torch.cat([torch.full((2, 1), tokenizer.bos_token_id), torch.tensor(text_ids).reshape(2, 31)], dim=1)
    model = AutoModelForCausalLM.from_pretrained(bos_llama_dir).eval()
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert report["ppl"]["dense"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_plain_tokenizer_keeps_plain_windows(tmp_path, tiny_llama_dir):
    report = _compress(tiny_llama_dir, tmp_path / "auto")
    assert report["calibration"]["bos"] is False and report["evaluation"]["bos"] is False
    forced = _compress(tiny_llama_dir, tmp_path / "always", "--bos", "always")
    assert forced["calibration"]["bos"] is True and forced["ppl"]["dense"] != report["ppl"]["dense"]


def test_eval_uses_the_same_convention(tmp_path, bos_llama_dir):
    report = _compress(bos_llama_dir, tmp_path / "out")
    auto = run("eval", tmp_path / "out", *EVAL)
    never = run("eval", tmp_path / "out", *EVAL, "--bos", "never")
    assert auto.exit_code == 0 and never.exit_code == 0, auto.output + never.output
    auto, never = json.loads(auto.stdout), json.loads(never.stdout)
    assert auto["evaluation"]["bos"] is True and never["evaluation"]["bos"] is False
    assert auto["ppl"] == pytest.approx(report["ppl"]["compressed"], rel=1e-4)
    assert never["ppl"] != pytest.approx(auto["ppl"], rel=1e-3)


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_bad_bos_value_is_a_usage_error(tmp_path, tiny_llama_dir, command):
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "o"] \
        if command == "compress" else ["eval", tiny_llama_dir, *EVAL[:-1]]
    result = run(*args, "--bos", "sometimes")
    assert_one_line_error(result)
    assert "bos must be one of auto, always, never" in result.stderr
    assert not (tmp_path / "o").exists()


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def chat_rows():
    from prune_cli.calibrators.sources import bundled_text

    paragraphs = [p for p in bundled_text("calibration").text.split("\n\n") if len(p) > 80][:60]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(paragraphs[::2], paragraphs[1::2])]


def test_chat_template_renders_messages_rows(tmp_path, tiny_llama_dir, chat_rows):
    import hashlib
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))

    result = run("compress", model_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--calib-text", data,
                 "--calib-chat-template", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rendered = "\n\n".join(tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows)
    assert report["calibration"]["chat_template"] is True
    assert report["calibration"]["text_sha256"] == hashlib.sha256(rendered.encode()).hexdigest()[:16]
    assert report["recipe"]["calibration"]["chat_template"] is True

    plain = run("compress", model_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--calib-text", data,
                "-o", tmp_path / "plain")
    assert_one_line_error(plain)
    assert "no field 'text'" in plain.stderr and "--calib-chat-template" in plain.stderr


def test_chat_template_needs_a_template_and_jsonl(tmp_path, tiny_llama_dir, chat_rows):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    base = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "--calib-chat-template"]
    no_template = run(*base, "--calib-text", data, "-o", tmp_path / "a")
    assert_one_line_error(no_template)
    assert "has no chat template" in no_template.stderr and not (tmp_path / "a").exists()
    no_files = run(*base, "-o", tmp_path / "b")
    assert_one_line_error(no_files)
    assert "applies to .jsonl calibration files" in no_files.stderr
