import pytest

from prune_cli.errors import ModelNotFoundError, UnsupportedArchitectureError
from prune_cli.model_io import block_linears, decoder_blocks, load_model, resolve_source
from tests.tiny_models import tiny_model


def test_resolve_source_kinds(tmp_path, tiny_llama_dir):
    assert resolve_source(str(tiny_llama_dir)).kind == "folder"
    assert resolve_source("org/name").kind == "hub"
    for missing in ["./nope", "/abs/missing", "x/y/z", "model.gguf"]:
        with pytest.raises(ModelNotFoundError):
            resolve_source(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_text("x")
    with pytest.raises(ModelNotFoundError, match="gguf"):
        resolve_source(str(tmp_path / "w.bin"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_model(resolve_source("someone/definitely-not-cached-model"), offline=True)


@pytest.mark.parametrize(
    "family,path,names",
    [
        ("llama", "model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        ("opt", "model.decoder.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}),
    ],
)
def test_blocks_and_linears_found(family, path, names):
    model = tiny_model(family)
    blocks = decoder_blocks(model)
    assert blocks.path == path and len(blocks) == 2
    assert set(block_linears(blocks.modules[0])) == names


def test_gpt2_conv1d_is_unsupported_with_a_clear_message():
    with pytest.raises(UnsupportedArchitectureError, match="Conv1D"):
        decoder_blocks(tiny_model("gpt2"))
