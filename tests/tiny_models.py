"""Tiny random causal LMs of the common decoder families (Llama, Mistral, Qwen2, Qwen3, Gemma 3,
Phi-3, OPT, GPT-NeoX, GPT-2), built in-process, with a tiny BPE tokenizer trained on the bundled
text, saved as ordinary Hugging Face folders."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

VOCAB = 384


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab: int = VOCAB, adds_bos: bool = False):
    """A byte-level BPE tokenizer trained on the bundled text; ``adds_bos``: it prepends ``<s>``
    by default (a ``TemplateProcessing`` post-processor, as Gemma's and Llama 3's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from prune_cli.calibrators.sources import bundled_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([bundled_text("calibration").text[:200_000]], trainer=trainer)
    if adds_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, layers: int = 2):
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        )
    if family == "opt":
        from transformers import OPTConfig

        return OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=1024, word_embed_proj_dim=64,
        )
    if family == "mistral":
        from transformers import MistralConfig

        return MistralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=16,
            tie_word_embeddings=False,
        )
    if family == "qwen2":  # biases in q/k/v
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        )
    if family == "qwen3":  # q/k RMSNorm, explicit head_dim
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, head_dim=32,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        )
    if family == "gemma3":  # sliding and global layers (two rotary embeddings), scaled embeddings, tied head
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=max(layers, 2), head_dim=16,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * (max(layers, 2) // 2)
            + ["sliding_attention"] * (max(layers, 2) % 2),
            query_pre_attn_scalar=16, tie_word_embeddings=True,
        )
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        from transformers import Phi3Config

        return Phi3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            original_max_position_embeddings=1024, pad_token_id=0, tie_word_embeddings=False,
        )
    if family == "gpt_neox":  # Pythia: parallel attention + MLP, fused query_key_value, partial rotary
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=1024, rotary_pct=0.25, tie_word_embeddings=False,
        )
    if family == "mixtral":  # experts fused by transformers into 3-D tensors
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=1024,
        )
    if family == "qwen2_moe":  # routed experts + a shared expert with its own gate Linear
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
        )
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
            num_experts_per_tok=2, max_position_embeddings=1024,
        )
    if family == "gpt_oss":  # experts with biases and interleaved gate/up: not the standard forward
        from transformers import GptOssConfig

        return GptOssConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=4096, head_dim=16,
        )
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=1024)
    raise ValueError(family)


def tiny_model(family: str, layers: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers))
    return model.eval()


def save_tiny_model(family: str, folder: Path, layers: int = 2, adds_bos: bool = False) -> Path:
    model = tiny_model(family, layers)
    model.save_pretrained(folder)
    tiny_tokenizer(adds_bos=adds_bos).save_pretrained(folder)
    return Path(folder)
