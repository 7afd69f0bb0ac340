"""Random-weight Llama checkpoints of any depth written straight to disk (one tensor in memory
at a time), as sharded safetensors with the standard index: the stand-ins for models larger
than the machine in the memory tests and ``bench/memory_scale.py``."""

from __future__ import annotations

from pathlib import Path

import torch

from prune_cli.checkpoint.model_state import empty_model, state_names, tied_names
from prune_cli.checkpoint.shards import StreamingCheckpoint, TensorSpec


def write_random_llama(
    folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, tokenizer,
    tie: bool = False, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 1 << 30, seed: int = 0,
) -> int:
    """Write a Llama of that shape with N(0, 0.02^2) weights (norms 1) and ``tokenizer`` into
    ``folder``; returns the bytes of its weights."""
    from transformers import LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config.dtype = str(dtype).split(".")[-1]
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    model = empty_model(config, dtype)
    tied = tied_names(model)
    specs = [TensorSpec(n, tuple(model.get_parameter(n).shape), dtype) for n in state_names(model) if n not in tied]
    files = StreamingCheckpoint(folder, specs, max_shard_bytes=max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        if spec.name.endswith("norm.weight"):
            value = torch.ones(spec.shape)
        else:
            value = torch.randn(spec.shape, generator=generator) * 0.02
        files.write(spec.name, value.to(dtype))
    files.finish()
    tokenizer.save_pretrained(folder)
    return sum(s.nbytes for s in specs)
