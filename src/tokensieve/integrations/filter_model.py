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
run in any engine, e.g. vLLM with tensor parallelism (``tokensieve.integrations.vllm_adapter``).

The filter model keeps the *full* model's ``model_type`` but not its depth; the layer it was loaded for is
kept as ``model.config.tokensieve_filter_layer`` (:func:`filter_layer_of` reads it), and
``GemFilter(filter_layer=None)`` takes that layer.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.core.draft import FILTER_LAYER_KEY, filter_layer_of, input_device  # noqa: F401  (their home is core)
from tokensieve.errors import InputError, check_int, require_extra

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
CONFIG_KEY = FILTER_LAYER_KEY  # the config attribute holding the layer a filter-only model was loaded for
FULL_LAYERS_KEY = "tokensieve_full_layers"


def filter_config(config: PretrainedConfig, filter_layer: int) -> PretrainedConfig:
    """A copy of ``config`` (a causal LM's) with only layers ``0 .. filter_layer``.

    Per-layer lists of the text config (``layer_types``) are cut to the same length. ``InputError`` when
    ``filter_layer`` is not a layer of the model.
    """
    cfg = copy.deepcopy(config)
    text = cfg.get_text_config()
    n = int(text.num_hidden_layers)
    check_int("filter_layer", filter_layer, 0, n - 1, note=" for this model")
    keep = filter_layer + 1
    for name in ("layer_types",):
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(text, name, list(value[:keep]))
    text.num_hidden_layers = keep
    setattr(cfg, CONFIG_KEY, filter_layer)
    setattr(cfg, FULL_LAYERS_KEY, n)
    return cfg


def _check_device_map(device_map: str | dict[str, Any] | None) -> None:
    """``InputError`` for a ``device_map`` of no known form; ``MissingExtraError`` when one is given and accelerate,
    which places the modules, is not installed (the ``multigpu`` extra)."""
    if device_map is None:
        return
    if isinstance(device_map, dict) or (
        isinstance(device_map, str)
        and (
            device_map in DEVICE_MAP_STRATEGIES or device_map in ("cpu", "disk", "mps") or device_map.startswith("cuda")
        )
    ):
        require_extra("multigpu", f"a filter model placed with device_map={device_map!r} (or pass device_map=None)")
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

    from tokensieve.core.attention import use_tokensieve_attention
    from tokensieve.core.models import (
        ModelLoadError,
        default_device,
        default_dtype,
        drop_null_quantization,
        parse_dtype,
    )

    _check_device_map(device_map)
    dtype = parse_dtype(dtype) or default_dtype(default_device())
    path = str(Path(name_or_path).expanduser()) if Path(str(name_or_path)).expanduser().exists() else str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the config of model {name_or_path!r}: {e}") from None
    drop_null_quantization(config)  # a copy stored by an earlier version (transformers 5.0 fails on it)
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
        tied = (
            m.get_output_embeddings() is not None
            and m.get_output_embeddings().weight is m.get_input_embeddings().weight
        )
        head = 0 if tied or m.get_output_embeddings() is None else m.get_output_embeddings().weight.numel()
        return sum(p.numel() for p in m.parameters()), layers, head

    full, full_layers, _ = count(config)
    part, part_layers, head = count(filter_config(config, filter_layer))
    kept = part - head
    return {
        "layers": part_layers / full_layers,
        "total": kept / full,
        "full_params": float(full),
        "filter_params": float(kept),
    }


def _resolve_device_map(
    model: torch.nn.Module, device_map: str | dict[str, Any], max_memory: dict | None, dtype: torch.dtype
) -> dict[str, Any]:
    """An explicit ``{module name: device}`` map for a model on the meta device (accelerate's rules for
    the strategies, as ``from_pretrained`` applies them)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map not in DEVICE_MAP_STRATEGIES:  # one device for everything
        return {"": device_map}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def build_filter_model(
    config: PretrainedConfig,
    filter_layer: int,
    device_map: str | dict[str, Any] | None = "auto",
    max_memory: dict[int | str, int | str] | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> PreTrainedModel:
    """Random weights in ``config``'s shape, holding only layers ``0 .. filter_layer``: the filter model of a
    checkpoint nobody needs to download, for timing and memory (which do not depend on weight values).

    The same placement as :func:`load_filter_model`: ``device_map`` (a strategy with ``max_memory``, one
    device, or a ``{module: device}`` dict) is resolved by accelerate and the model is dispatched with its
    hooks, so modules mapped to ``"cpu"`` while a GPU runs the rest are offloaded (kept in host memory,
    executed on the GPU). Weights are drawn on their device (normal, ``std``; norms 1), host-placed ones
    on the first GPU and copied. ``None`` builds everything on the CPU. The LM head stays on ``meta`` (never called).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tokensieve.core.attention import use_tokensieve_attention
    from tokensieve.core.models import default_device, default_dtype, parse_dtype

    _check_device_map(device_map)
    dtype = parse_dtype(dtype) or default_dtype(default_device())
    cfg = filter_config(config, filter_layer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    placement = {"": "cpu"} if device_map is None else _resolve_device_map(model, device_map, max_memory, dtype)
    if "disk" in placement.values():
        raise InputError(
            "build_filter_model places modules on GPUs and the CPU, not on disk; drop 'disk' from device_map"
        )
    gen = torch.Generator().manual_seed(seed)
    # Drawing random numbers on the host is slow (minutes for tens of GiB): host-placed weights are drawn on
    # the first GPU, if there is one, and copied.
    draw_on = next(
        (
            torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
            for d in placement.values()
            if str(d) not in ("cpu", "meta")
        ),
        torch.device("cpu"),
    )
    for name, dev in sorted(placement.items(), key=lambda kv: len(kv[0])):  # parents first, children override
        module = model.get_submodule(name) if name else model
        module.to_empty(
            device=torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev), recurse=True
        )
    if head is not None and not tied:
        head.to("meta")
    for pname, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        with torch.no_grad():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in pname else 0.0)
            else:  # seeded from the host generator, drawn on the parameter's device or the GPU
                at = p.device if p.device.type != "cpu" else draw_on
                g = torch.Generator(at).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
                if at == p.device:
                    p.normal_(0.0, std, generator=g)
                else:
                    p.copy_(torch.empty(p.shape, dtype=p.dtype, device=at).normal_(0.0, std, generator=g))
    _rebuild_buffers(model, cfg)
    model.eval()
    if device_map is not None:
        from accelerate import dispatch_model

        if len({str(d) for d in placement.values()}) > 1:
            gpus = [d for d in placement.values() if str(d) not in ("cpu", "meta")]
            dispatch_model(model, device_map=placement, main_device=gpus[0] if gpus else None)
        model.hf_device_map = placement
    model.generation_config.eos_token_id = None
    use_tokensieve_attention(model)
    return model


def _rebuild_buffers(model: torch.nn.Module, config: PretrainedConfig) -> None:
    """Non-persistent buffers are computed at construction, so ``to_empty`` leaves them uninitialised:
    rebuild the rotary embeddings (the only kind these decoder models hold) on their device."""
    import torch

    for name, module in list(model.named_modules()):
        own = list(module.named_buffers(recurse=False))
        if not own:
            continue
        if "rotary" not in type(module).__name__.lower():
            raise InputError(
                f"build_filter_model cannot initialise the buffers {[b for b, _ in own]} of {name} "
                f"({type(module).__name__}); load the checkpoint with load_filter_model instead"
            )
        dev = own[0][1].device
        if dev.type == "meta":
            continue
        with torch.device(dev):
            fresh = type(module)(config=config.get_text_config())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, fresh)
