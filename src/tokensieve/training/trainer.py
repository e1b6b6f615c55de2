"""Training under SepLLM's attention rule (or full attention): post-training an existing model or from scratch.

Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One Segment into One Separator",
ICML 2025 (arXiv:2412.12094), training-from-scratch and post-training settings: the model is trained with
every query restricted to the first ``n_initial`` tokens, the separators before it and its ``n_recent``
neighbours, so that it learns to pack each segment into the separator that ends it; the training-free
method (``tokensieve.methods.sepllm``) then loses less at inference.

``train(TrainConfig(...))`` runs AdamW (linear warmup, cosine decay to a tenth of ``lr``, gradient
clipping, gradient accumulation) over packed rows of the ``data`` text, evaluates held-out text every
``eval_every`` steps under the training mask and under full attention, writes a JSONL log, checkpoints
(``OUT/checkpoint``: the model as safetensors, the tokenizer, the optimizer and step state) every
``save_every`` steps and on Ctrl-C, and saves the final model with ``save_pretrained`` in ``OUT``
(loadable with ``--model OUT`` by every command). ``resume(OUT)`` continues from the checkpoint with the
saved configuration and gives exactly the weights an uninterrupted run gives (same batches, same RNG).
With ``lora_rank`` > 0 post-training trains a low-rank adapter (``tokensieve.training.lora``) instead of every
weight: the checkpoint holds the frozen base model plus ``adapter.safetensors``, and ``OUT`` the merged model.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tokensieve.errors import InputError, check_choice, check_int, check_number
from tokensieve.training.lora import (
    ADAPTER_FILE,
    adapter_state,
    add_lora,
    check_lora,
    count_parameters,
    load_adapter_state,
    lora_layers,
    merge_lora,
    unwrapped,
)
from tokensieve.training.mask import KERNELS, MASKS, training_hook

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    """What to train and how. Every field is bounded (``check``); the defaults post-train ``model``.

    model: embedded name or model folder to post-train; with ``from_scratch``, where the tokenizer comes from.
    out: output folder (the final model, ``checkpoint/``, ``log.jsonl``).
    data / eval_data: text files or folders (``eval_data`` empty: no evaluation).
    from_scratch: a new Llama-style model of ``layers`` x ``hidden`` (``heads``, ``kv_heads``, MLP ``intermediate``,
        0: ``4 * hidden``), the tokenizer's vocabulary, tied embeddings, weights drawn with ``seed``.
    mask: ``"sepllm"`` (the training mask) or ``"full"`` (plain causal attention, the control).
    n_initial, n_recent, include_space: SepLLM's rule (as ``tokensieve.methods.sepllm.SepLLM``).
    kernel: ``"flex"`` (FlexAttention over the gathered separators and the window; its backward needs a GPU),
        ``"flex-mask"`` (FlexAttention, plain block mask), ``"sdpa"`` (dense boolean mask), ``None``:
        :func:`default_kernel` (flex on CUDA for rows of at least ``FLEX_FROM_LENGTH`` tokens, else sdpa).
    dtype: float32, or bfloat16/float16 autocast over float32 weights (mixed precision).
    lora_rank: 0 (default) trains every weight; 1..1024 freezes the model and trains a low-rank adapter of that
        rank on ``lora_targets`` (``"attn"``: q/k/v/o projections; ``"attn+mlp"``: also gate/up/down), scaled
        by ``lora_alpha / lora_rank``; the saved model has the adapter merged. Post-training only.
    """

    model: str = "smollm2"
    out: str = "trained"
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    from_scratch: bool = False
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 0
    seq_len: int = 1024
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mask: str = "sepllm"
    n_initial: int = 4
    n_recent: int = 256
    include_space: bool = False
    kernel: str | None = None
    device: str | None = None
    dtype: str = "float32"
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    max_tokens: int = 50_000_000
    encoding: str = "utf-8"
    encoding_errors: str = "strict"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "attn"

    def check(self) -> None:
        """``InputError`` naming the first field out of its bounds."""
        from tokensieve.core.models import dtype_name, parse_device

        if not str(self.model).strip():
            raise InputError("model must name an embedded model or a model folder, got ''")
        if not str(self.out).strip():
            raise InputError("out must name an output folder, got ''")
        if not self.data:
            raise InputError("data names no files; expected text files or folders (--data)")
        check_int("layers", self.layers, 1, 128)
        check_int("heads", self.heads, 1, 256)
        check_int("kv_heads", self.kv_heads, 1, self.heads)
        check_int("hidden", self.hidden, 8, 16384)
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise InputError(
                f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}) and heads of "
                f"kv_heads ({self.kv_heads})"
            )
        check_int("intermediate", self.intermediate, 0, 65536)
        check_int("seq_len", self.seq_len, 8, 131072)
        check_int("batch_size", self.batch_size, 1, 1024)
        check_int("grad_accum", self.grad_accum, 1, 1024)
        check_int("steps", self.steps, 1, 10_000_000)
        check_number("lr", self.lr, 0.0, 1.0, above=True)
        check_int("warmup", self.warmup, 0, self.steps)
        check_number("weight_decay", self.weight_decay, 0.0, 1.0)
        check_number("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        check_choice("mask", self.mask, MASKS)
        check_int("n_initial", self.n_initial, 0, 1 << 20)
        check_int("n_recent", self.n_recent, 0, 1 << 20)  # >= seq_len: every row sees everything (full attention)
        if self.kernel is not None:
            check_choice("kernel", self.kernel, KERNELS)
        self.device = parse_device(self.device)
        self.dtype = dtype_name(self.dtype)
        check_int("eval_every", self.eval_every, 1, 10_000_000)
        check_int("eval_batches", self.eval_batches, 1, 100_000)
        check_int("save_every", self.save_every, 1, 10_000_000)
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_int("max_tokens", self.max_tokens, self.seq_len, 10_000_000_000)
        check_choice("encoding_errors", self.encoding_errors, ("strict", "replace"))
        check_lora(self.lora_rank, self.lora_alpha, self.lora_targets)
        if self.from_scratch and self.lora_rank:
            raise InputError(
                f"lora_rank {self.lora_rank} with from_scratch: a new model trains every weight; "
                "expected --lora-rank 0 or post-training an existing --model"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    """What a run did: ``out`` folder, steps done, the training loss per step, the evaluations, whether Ctrl-C
    stopped it (then ``out/checkpoint`` holds the last finished step and ``resume(out)`` continues)."""

    out: Path
    step: int
    losses: list[float]
    evals: list[dict[str, Any]]
    interrupted: bool = False
    tokens_per_s: float | None = None
    trainable_parameters: int | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: linear warmup over ``warmup`` steps, then cosine decay to ``lr / 10``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _new_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate or 4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(2048, cfg.seq_len),
        tie_word_embeddings=True,
        **{k: v for k, v in ids.items() if v is not None},
    )
    return LlamaForCausalLM(config)


def _load(cfg: TrainConfig, device: str, resume_from: Path | None):
    from tokensieve.core.attention import use_tokensieve_attention
    from tokensieve.core.models import load_model

    if resume_from is not None:
        model, tok = load_model(str(resume_from), dtype="float32", device=device)
    elif cfg.from_scratch:
        _, tok = _tokenizer_of(cfg.model)
        model = _new_model(cfg, tok).to(device)
    else:
        model, tok = load_model(cfg.model, dtype="float32", device=device)
    use_tokensieve_attention(model)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
        if resume_from is not None:
            from safetensors.torch import load_file

            if not (resume_from / ADAPTER_FILE).is_file():
                raise InputError(f"{resume_from} holds no {ADAPTER_FILE}; expected the checkpoint of a LoRA run")
            load_adapter_state(model, load_file(str(resume_from / ADAPTER_FILE), device=device))
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise InputError(f"seq_len {cfg.seq_len} exceeds the model's {max_pos} positions")
    return model, tok


def _tokenizer_of(name: str):
    """The tokenizer of a model folder (read alone) or of an embedded model (loaded with it)."""
    from transformers import AutoTokenizer

    from tokensieve.core.models import load_model, model_source

    kind, where = model_source(name)
    if kind == "folder":
        return None, AutoTokenizer.from_pretrained(str(where))
    model, tok = load_model(name, dtype="float32", device="cpu")
    return model, tok


def _autocast(cfg: TrainConfig, device: str):
    if cfg.dtype == "float32":
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, cfg.dtype))


# Below this row length the dense masked SDPA is the faster training kernel on the GPU (docs/training.md: measured
# dense faster at 2k, the compact FlexAttention layout faster from 16k; lengths between are left to the dense one).
FLEX_FROM_LENGTH = 16384


def default_kernel(device: str, seq_len: int) -> str:
    """The training kernel when none is asked for: ``"flex"`` on CUDA for rows of at least ``FLEX_FROM_LENGTH``
    tokens, else ``"sdpa"`` (never the slower of the two where measured)."""
    return "flex" if device.startswith("cuda") and seq_len >= FLEX_FROM_LENGTH else "sdpa"


def _loss(model, ids: torch.Tensor, cfg: TrainConfig, mask: str, kernel: str, separators) -> torch.Tensor:
    from tokensieve.core.attention import HOOK_KWARG

    hook = training_hook(ids, separators, mask, cfg.n_initial, cfg.n_recent, kernel)
    extra = {} if hook is None else {HOOK_KWARG: hook}
    return model(input_ids=ids, labels=ids, use_cache=False, **extra).loss


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, cfg: TrainConfig, kernel: str, separators, device: str) -> dict[str, Any]:
    """Mean held-out loss and perplexity of ``rows`` [n, seq_len] (up to ``eval_batches`` batches) under SepLLM's
    rule (``loss_mask``, ``ppl_mask``; with ``cfg``'s ``n_initial``/``n_recent``, whatever mask the model trains
    under) and under full attention (``loss_full``, ``ppl_full``)."""
    was = model.training
    model.eval()
    out: dict[str, Any] = {}
    masks = ("sepllm", "full")
    n = min(rows.shape[0], cfg.eval_batches * cfg.batch_size)
    for m in masks:
        total = 0.0
        for b0 in range(0, n, cfg.batch_size):
            ids = rows[b0 : min(n, b0 + cfg.batch_size)].to(device)
            with _autocast(cfg, device):
                total += float(_loss(model, ids, cfg, m, kernel, separators)) * ids.shape[0]
        key = "mask" if m == "sepllm" else "full"
        out[f"loss_{key}"] = total / n
        out[f"ppl_{key}"] = math.exp(total / n)
    model.train(was)
    return out


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(out: Path, model, tokenizer, optimizer, step: int, cfg: TrainConfig) -> Path:
    """``out/checkpoint``: the model (safetensors, ``save_pretrained``; with a LoRA adapter, the frozen base model
    plus ``adapter.safetensors``), the tokenizer, ``trainer_state.pt`` (optimizer state, step, RNG) and
    ``train_config.json``; written beside and renamed into place."""
    target, tmp = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with unwrapped(model):
        model.save_pretrained(str(tmp))
    if lora_layers(model):
        from safetensors.torch import save_file

        first = lora_layers(model)[0][1]
        meta = {"rank": str(first.rank), "alpha": repr(first.alpha), "targets": str(cfg.lora_targets)}
        save_file(adapter_state(model), str(tmp / ADAPTER_FILE), metadata=meta)
    tokenizer.save_pretrained(str(tmp))
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": _rng_state()}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
    old = out / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _rows(paths: list[str], tokenizer, cfg: TrainConfig, what: str, say: Callable[[str], None]) -> torch.Tensor:
    from tokensieve.training.data import pack, text_files, tokenize_files

    ids = tokenize_files(
        text_files(paths, what), tokenizer, cfg.max_tokens, cfg.encoding, cfg.encoding_errors, progress=say
    )
    return pack(ids, cfg.seq_len, what)


def train(
    cfg: TrainConfig,
    *,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    _resume_from: Path | None = None,
) -> TrainResult:
    """Train as ``cfg`` says (see the module docstring); returns a ``TrainResult``.

    ``on_step(step, loss)`` is called after each optimizer step (1-based step). Ctrl-C (``KeyboardInterrupt``,
    raised by ``on_step`` too) saves ``out/checkpoint`` at the last finished step and returns with
    ``interrupted=True``. ``progress``: a tqdm bar with loss and tokens/s on stderr.
    """
    from tqdm import tqdm

    from tokensieve.core.models import default_device
    from tokensieve.core.separators import separator_token_ids
    from tokensieve.training.data import Batches

    cfg.check()
    device = cfg.device or default_device()
    kernel = cfg.kernel or default_kernel(device, cfg.seq_len)
    if kernel.startswith("flex") and device == "cpu" and cfg.mask == "sepllm":
        raise InputError(
            f"kernel {kernel} trains on a GPU only (PyTorch's FlexAttention has no backward on CPU); "
            "use --kernel sdpa on the CPU"
        )
    out = Path(cfg.out).expanduser()
    if _resume_from is None and (out / CHECKPOINT).exists():
        raise InputError(f"{out} already holds a checkpoint; resume it (--resume {out}) or choose another --out")

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    from tokensieve.training.data import text_files

    text_files(cfg.data, "--data")  # missing files are reported before a model loads
    if cfg.eval_data:
        text_files(cfg.eval_data, "--eval-data")
    model, tok = _load(cfg, device, _resume_from)
    separators = separator_token_ids(tok, cfg.include_space).to(device)
    train_rows = _rows(cfg.data, tok, cfg, "--data", say)
    eval_rows = _rows(cfg.eval_data, tok, cfg, "--eval-data", say) if cfg.eval_data else None
    batches = Batches(train_rows, cfg.batch_size, cfg.seed)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    start = 0
    if _resume_from is not None:
        state = torch.load(_resume_from / STATE_FILE, map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    out.mkdir(parents=True, exist_ok=True)
    if start == 0:
        (out / LOG_FILE).unlink(missing_ok=True)
        _log(
            out,
            {
                "event": "start",
                "config": asdict(cfg),
                "kernel": kernel,
                "device": device,
                "train_rows": train_rows.shape[0],
                "eval_rows": None if eval_rows is None else eval_rows.shape[0],
                "parameters": count_parameters(model)[1],
                "trainable_parameters": count_parameters(model)[0],
            },
        )

    result = TrainResult(out, start, [], [], trainable_parameters=count_parameters(model)[0])
    if eval_rows is not None and start == 0:
        ev = {"event": "eval", "step": 0} | evaluate(model, eval_rows, cfg, kernel, separators, device)
        result.evals.append(ev)
        _log(out, ev)
        say(f"step 0: held-out loss {ev['loss_mask']:.4f} (mask) {ev['loss_full']:.4f} (full)")
    model.train()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    step, t_run, n_run = start, 0.0, 0
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            total = 0.0
            for micro in range(cfg.grad_accum):
                ids = batches(step * cfg.grad_accum + micro).to(device)
                with _autocast(cfg, device):
                    loss = _loss(model, ids, cfg, cfg.mask, kernel, separators)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else 0.0
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            t_run, n_run = t_run + dt, n_run + 1
            result.step = step
            result.losses.append(total)
            tps = tokens_per_step / dt
            _log(
                out,
                {
                    "event": "train",
                    "step": step,
                    "loss": total,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tps,
                },
            )
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if eval_rows is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                ev = {"event": "eval", "step": step} | evaluate(model, eval_rows, cfg, kernel, separators, device)
                result.evals.append(ev)
                _log(out, ev)
                if progress:
                    bar.write(
                        f"step {step}: held-out loss {ev['loss_mask']:.4f} (mask) {ev['loss_full']:.4f} (full)",
                        file=sys.stderr,
                    )
            if step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(out, model, tok, optimizer, step, cfg)
            if on_step is not None:
                on_step(step, total)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        bar.close()
        save_checkpoint(out, model, tok, optimizer, step, cfg)
        _log(out, {"event": "interrupted", "step": step})
        result.interrupted = True
        result.tokens_per_s = tokens_per_step * n_run / t_run if t_run else None
        return result
    bar.close()
    result.tokens_per_s = tokens_per_step * n_run / t_run if t_run else None
    save_checkpoint(out, model, tok, optimizer, step, cfg)
    merge_lora(model)  # a no-op without an adapter
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _log(out, {"event": "done", "step": step, "tokens_per_s": result.tokens_per_s})
    return result


def resume(
    out: str | Path,
    *,
    steps: int | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Continue the run whose checkpoint is in ``out/checkpoint``, with its saved configuration (``steps``: a new
    total, at least the step reached). The weights equal those of a run never interrupted."""
    ckpt = Path(out).expanduser() / CHECKPOINT
    if not (ckpt / STATE_FILE).is_file() or not (ckpt / CONFIG_FILE).is_file():
        raise InputError(
            f"{Path(out)} holds no training checkpoint ({CHECKPOINT}/{STATE_FILE}); expected the --out "
            f"folder of an earlier `tokensieve train`"
        )
    cfg = TrainConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
    cfg.out = str(Path(out).expanduser())
    done = int(torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)["step"])
    if steps is not None:
        check_int("steps", steps, max(1, done), 10_000_000)
        cfg.steps = steps
    if done >= cfg.steps:
        raise InputError(
            f"the checkpoint in {out} is at step {done} of {cfg.steps}: nothing left to train (pass a larger --steps)"
        )
    return train(cfg, progress=progress, on_step=on_step, _resume_from=ckpt)
