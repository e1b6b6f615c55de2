"""GemFilter's filter pass on a model too large for one device: load only layers ``0 .. r``.

GemFilter's filter pass (``GemFilter.select``) runs decoder layers ``0 .. r-1`` and layer ``r``'s
attention, then stops: layers ``r+1 .. L-1``, the final norm and the LM head are never used. So the
filter model is loaded from the checkpoint with a config whose ``num_hidden_layers`` is ``r + 1``;
transformers then builds only those layers and skips the other layers' weights in the checkpoint
(they are reported as unexpected keys and never read into memory). The weights held are the
embeddings, the fraction ``(r + 1) / L`` of the decoder-layer weights and, when the head is not tied
to the embeddings, the LM head (put on ``"meta"`` by ``drop_lm_head``: it is never called).

``device_map`` spreads the layers that are loaded over the visible devices with accelerate (``"auto"``,
``"balanced"``, ``"sequential"`` or an explicit ``{module name: device}`` dict), so the filter pass of a
model larger than one GPU runs over several GPUs; the second pass (the model on the kept ids) can then
run in any engine, e.g. vLLM with tensor parallelism (``tokensieve.vllm_adapter``).

The filter model keeps the *full* model's ``model_type`` but not its depth, so
``GemFilter(filter_layer=None)`` would look up the wrong default: pass ``filter_layer=r`` (the value is
also kept as ``model.config.tokensieve_filter_layer``; :func:`filter_layer_of` reads it).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
CONFIG_KEY = "tokensieve_filter_layer"
FULL_LAYERS_KEY = "tokensieve_full_layers"


def filter_config(config: PretrainedConfig, filter_layer: int) -> PretrainedConfig:
    """A copy of ``config`` (a causal LM's) with only layers ``0 .. filter_layer``.

    Per-layer lists of the text config (``layer_types``) are cut to the same length. ``InputError`` when
    ``filter_layer`` is not a layer of the model.
    """
    cfg = copy.deepcopy(config)
    text = cfg.get_text_config()
    n = int(text.num_hidden_layers)
    if isinstance(filter_layer, bool) or not isinstance(filter_layer, int) or not 0 <= filter_layer < n:
        raise InputError(f"filter_layer must be an integer in [0, {n - 1}] for this model, got {filter_layer!r}")
    keep = filter_layer + 1
    for name in ("layer_types",):
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(text, name, list(value[:keep]))
    text.num_hidden_layers = keep
    setattr(cfg, CONFIG_KEY, filter_layer)
    setattr(cfg, FULL_LAYERS_KEY, n)
    return cfg


def filter_layer_of(model: PreTrainedModel) -> int | None:
    """The filter layer a model was loaded for by :func:`load_filter_model` (None for a full model)."""
    value = getattr(model.config, CONFIG_KEY, None)
    return int(value) if value is not None else None


def _check_device_map(device_map: str | dict[str, Any] | None) -> None:
    if device_map is None or isinstance(device_map, dict):
        return
    if isinstance(device_map, str) and (
        device_map in DEVICE_MAP_STRATEGIES or device_map in ("cpu", "disk", "mps") or device_map.startswith("cuda")
    ):
        return
    raise InputError(
        f"device_map must be one of {DEVICE_MAP_STRATEGIES}, a device name, or a {{module: device}} dict, got {device_map!r}"
    )


def load_filter_model(
    name_or_path: str | Path,
    filter_layer: int,
    device_map: str | dict[str, Any] | None = "auto",
    max_memory: dict[int | str, int | str] | None = None,
    dtype: torch.dtype | str | None = None,
    offload_folder: str | Path | None = None,
    drop_lm_head: bool = True,
) -> PreTrainedModel:
    """A causal LM holding only its layers ``0 .. filter_layer``, ready for ``GemFilter(filter_layer=r).select``.

    name_or_path: a local transformers folder (or a hub id already in the local cache).
    filter_layer: GemFilter's ``r`` (0-based).
    device_map: accelerate placement of the loaded modules over the visible devices: a strategy
        (``"auto"`` etc.; with ``max_memory`` to cap each device), one device, or a dict
        ``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.layers.13": 1, ...}``.
        ``None`` loads onto the CPU without accelerate.
    max_memory: ``{0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``, as for transformers' ``from_pretrained``.
    dtype: float32, bfloat16, float16 (None: float32 on CPU, bfloat16 when CUDA is visible).
    offload_folder: where modules mapped to ``"disk"`` are kept.
    drop_lm_head: free the (untied) LM head after loading; the filter pass never reaches it.

    The model is in eval mode with tokensieve's attention installed. ``InputError`` for a bad
    ``filter_layer``, ``device_map`` or ``dtype``; ``ModelLoadError`` when the model is not found.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokensieve.attention import use_tokensieve_attention
    from tokensieve.models import ModelLoadError, default_device, default_dtype, parse_dtype

    _check_device_map(device_map)
    dtype = parse_dtype(dtype) or default_dtype(default_device())
    path = str(Path(name_or_path).expanduser()) if Path(str(name_or_path)).expanduser().exists() else str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the config of model {name_or_path!r}: {e}") from None
    cfg = filter_config(config, filter_layer)
    kwargs: dict[str, Any] = dict(config=cfg, dtype=dtype, local_files_only=True)
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if drop_lm_head:
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            # Never called by the filter pass; keep the module (its shape) but not its weights.
            head.to("meta")
    model.eval()
    use_tokensieve_attention(model)
    return model


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the token ids go: the device of the input embeddings (the first module of a split model)."""
    return model.get_input_embeddings().weight.device


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters that hold real data (those on ``meta`` are not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def filter_fraction(config: PretrainedConfig, filter_layer: int) -> dict[str, float]:
    """How much of the model a filter-only load holds, from the config's shapes (no weights read).

    Returns ``layers`` (``(r+1)/L`` of the decoder-layer weights), ``total`` (filter load / full model,
    parameters, the LM head dropped when untied) and the parameter counts ``full_params``,
    ``filter_params``. Counted by building both on the meta device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    def count(cfg: PretrainedConfig) -> tuple[int, int, int]:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        layers = sum(p.numel() for p in m.model.layers.parameters())
        tied = m.get_output_embeddings() is not None and m.get_output_embeddings().weight is m.get_input_embeddings().weight
        head = 0 if tied or m.get_output_embeddings() is None else m.get_output_embeddings().weight.numel()
        return sum(p.numel() for p in m.parameters()), layers, head

    full, full_layers, _ = count(config)
    part, part_layers, head = count(filter_config(config, filter_layer))
    kept = part - head
    return {"layers": part_layers / full_layers, "total": kept / full, "full_params": float(full), "filter_params": float(kept)}
