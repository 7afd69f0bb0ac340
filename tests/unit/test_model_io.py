import pytest
import torch

from prune_cli.core.errors import ModelNotFoundError, UnsupportedArchitectureError
from prune_cli.model.source import resolve_source
from prune_cli.model.structure import block_linears, decoder_blocks
from prune_cli.streaming.loader import load_model
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
    """A model as transformers builds it (GPT-2's Conv1D) is refused by decoder_blocks until
    its Conv1D modules are linearized (prune-cli's own loaders do that)."""
    with pytest.raises(UnsupportedArchitectureError, match="Conv1D"):
        decoder_blocks(tiny_model("gpt2"))


def test_conv1d_linearized_computes_the_same_and_saves_the_same():
    from prune_cli.model.conv1d import Conv1DLinear, linearize_conv1d

    model = tiny_model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    assert linearize_conv1d(model) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert set(block_linears(decoder_blocks(model).modules[0])) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1DLinear) and c_attn.weight.shape == (192, 64)  # (out, in)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
    after = model.state_dict()  # stored layout: (in, out), as transformers saves GPT-2
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    fresh = tiny_model("gpt2", seed=1)
    linearize_conv1d(fresh)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.transformer.h[0].attn.c_attn.weight, state["transformer.h.0.attn.c_attn.weight"].t())
