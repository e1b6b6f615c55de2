"""Shared fixtures: the one factory of tiny random-weight models (every test builds its models here) and a minimal tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import tokensieve

# The test folders mirror the package (tests/core, tests/methods, ...). Test modules import shared helpers from one
# another by module name (``from test_serve import serving``, ``from eval_support import byte_model``) wherever
# they live, so every folder is importable (the module names are unique across folders); subprocesses get
# ``TEST_DIRS`` on their PYTHONPATH.
TESTS = Path(__file__).resolve().parent
TEST_DIRS = [TESTS, *sorted(d for d in TESTS.iterdir() if d.is_dir() and d.name[0] not in "._")]
for _d in TEST_DIRS:
    if str(_d) not in sys.path:
        sys.path.append(str(_d))

VOCAB = 96


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """The CLI sets torch's thread count (``--threads`` or the small-machine default): a command run in the test
    process leaves the suite's own count as it was."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# Token ids written into the config by default (TinyTokenizer's bos is 1).
SUITE_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# The families' own config defaults (token ids, Gemma 3's query scaling 256), the weights as initialised and
# generation stopping at the config's eos: the models of the method tests that compare against slow references.
PLAIN = dict(ids={}, query_pre_attn_scalar=256, scale_head=False, stop_at_eos=True)


def tiny_model(
    family: str = "llama",
    *,
    layers: int = 6,
    vocab: int = VOCAB,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    max_pos: int = 512,
    seed: int = 0,
    init: float | None = None,
    dtype: torch.dtype | None = None,
    sliding_window: int = 16,
    layer_types: list[str] | None = None,
    query_pre_attn_scalar: int | None = None,
    ids: dict[str, int] = SUITE_IDS,
    stop_at_eos: bool = False,
    scale_head: bool = True,
    attn: str = "tokensieve",
) -> torch.nn.Module:
    """A tiny random-weight causal LM in eval mode with tokensieve's attention installed.

    family: llama, mistral (no sliding window), qwen2, qwen3, gemma3, or gpt2 (a type tokensieve's methods
        do not support; kv_heads, head_dim and the gemma3 arguments do not apply).
    layers, vocab, hidden, heads, kv_heads, max_pos: the sizes (the MLP is ``2 * hidden`` wide).
    head_dim: qwen3 and gemma3 only (None: ``hidden // heads``, what the other families use).
    seed: ``torch.manual_seed`` before the weights are drawn.
    init: ``initializer_range`` (None: the family's default, 0.02); a large one gives peaked attention.
    dtype: cast the weights after building (e.g. ``torch.float64`` for references compared at 1e-9).
    sliding_window, layer_types: gemma3 only (``layer_types`` None: Gemma's default pattern).
    query_pre_attn_scalar: gemma3 only; None: ``head_dim`` (the usual 1/sqrt(head_dim) scaling).
    ids: bos/eos/pad token ids written into the config; an id left out keeps the family's default.
    stop_at_eos: False: generation never stops early (``generation_config.eos_token_id = None``: random
        weights would stop at random points); True: it stops at the config's eos.
    scale_head: multiply an untied lm_head by 8 (random weights give near-uniform logits; scaled, greedy
        choices are not near-ties). Tied heads (gemma3) are left alone.
    attn: ``"tokensieve"`` switches the built model to tokensieve's attention (what ``load_model`` does); any
        other name (``"sdpa"``, ``"eager"``) is passed as the config's ``attn_implementation`` and kept: a model
        as a user's own ``from_pretrained`` gives it.
    """
    torch.manual_seed(seed)
    shared = dict(vocab_size=vocab, **ids, **({} if init is None else {"initializer_range": init}))
    if attn != "tokensieve":
        shared["attn_implementation"] = attn
    common = dict(
        shared,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
    )
    head_dim = head_dim or hidden // heads
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=head_dim))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                **common,
                head_dim=head_dim,
                sliding_window=sliding_window,
                layer_types=layer_types,
                query_pre_attn_scalar=query_pre_attn_scalar or head_dim,
            )
        )
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=hidden,
                n_layer=layers,
                n_head=heads,
                n_positions=max_pos,
                **shared,
            )
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}")
    model.eval()
    if scale_head and not model.config.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    if dtype is not None:
        model.to(dtype)
    if attn == "tokensieve":
        tokensieve.use_tokensieve_attention(model)
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    return model


class TinyTokenizer:
    """Just enough tokenizer for the runner: ids are their own text."""

    eos_token_id = None
    bos_token_id = 1
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __call__(self, text: str, return_tensors=None, add_special_tokens=True):
        ids = [int(t) % VOCAB for t in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def __len__(self) -> int:
        return VOCAB


@pytest.fixture
def tok() -> TinyTokenizer:
    return TinyTokenizer()


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    try:
        return tokensieve.load_model("smollm2")
    except tokensieve.ModelLoadError as exc:
        pytest.skip(str(exc))


def patch_model_load(monkeypatch, replacement, also_load_model: bool = False) -> None:
    """Replace the CLI's model load (``commands.common.load``, which the commands call as ``common.load``; with
    ``also_load_model``, ``core.models.load_model`` too, in every module that imported it by name) with
    ``replacement``, for one test. The command modules are imported first, so that none is first imported while
    the stand-in is in place."""
    import importlib
    import pkgutil
    import sys

    import tokensieve.commands as commands
    from tokensieve.commands import common
    from tokensieve.core import models

    for info in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"tokensieve.commands.{info.name}")
    real = {"load": common.load} | ({"load_model": models.load_model} if also_load_model else {})
    for name, module in list(sys.modules.items()):
        if name.startswith("tokensieve") and module is not None:
            for attr, fn in real.items():
                if getattr(module, attr, None) is fn:
                    monkeypatch.setattr(module, attr, replacement)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the command line (argparse's SystemExit included)."""
    from tokensieve.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
