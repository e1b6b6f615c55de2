"""Training under SepLLM's mask: the rule, the two kernels, the trainer (loss, mask, exact resume) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_model

import tokensieve
from tokensieve.core.attention import HOOK_KWARG
from tokensieve.core.separators import separator_token_ids
from tokensieve.errors import InputError
from tokensieve.testing import byte_tokenizer
from tokensieve.training import (
    KERNELS,
    MASKS,
    TrainConfig,
    resume,
    sepllm_dense_mask,
    train,
    training_hook,
)

FAMILIES = ["llama", "qwen2", "mistral", "qwen3"]
TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin nuzzled "
    "into his breast in an effort to escape the vile wind, slipped quickly through the glass doors; not quickly "
    "enough to prevent a swirl of gritty dust from entering along with him.\nThe hallway smelt of boiled cabbage "
    "and old rag mats! At one end of it a coloured poster, too large for indoor display, had been tacked to the "
    "wall: it depicted simply an enormous face, more than a metre wide? "
)


def slow_rule(is_sep: list[bool], n_initial: int, n_recent: int) -> list[list[bool]]:
    """SepLLM's rule written out pair by pair."""
    n = len(is_sep)
    out = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if j > i:
                continue
            if j < n_initial or is_sep[j] or i - j <= n_recent:
                out[i][j] = True
    return out


@pytest.mark.parametrize("n_initial, n_recent", [(0, 0), (3, 4), (4, 100)])
def test_dense_mask_is_the_rule_written_out(n_initial, n_recent):
    g = torch.Generator().manual_seed(0)
    is_sep = torch.rand(3, 37, generator=g) < 0.2
    mask = sepllm_dense_mask(is_sep, n_initial, n_recent)
    assert mask.shape == (3, 1, 37, 37)
    for b in range(3):
        assert mask[b, 0].tolist() == slow_rule(is_sep[b].tolist(), n_initial, n_recent)


@pytest.mark.parametrize("n_initial, n_recent", [(0, 0), (2, 5), (3, 60)])
def test_compact_layout_gives_each_query_exactly_the_rules_keys_once(n_initial, n_recent):
    from tokensieve.training.mask import compact_mask_mod, special_positions

    g = torch.Generator().manual_seed(1)
    is_sep = torch.rand(2, 45, generator=g) < 0.15
    spec = special_positions(is_sep, n_initial, bucket=8)
    assert spec.shape[1] % 8 == 0
    mod = compact_mask_mod(spec, n_initial, n_recent)
    s = spec.shape[1]
    for b in range(2):
        expected = slow_rule(is_sep[b].tolist(), n_initial, n_recent)
        for i in range(45):
            seen = []
            for kv in range(s + 45):
                if mod(torch.tensor(b), torch.tensor(0), torch.tensor(i), torch.tensor(kv)):
                    seen.append(int(spec[b, kv]) if kv < s else kv - s)
            assert sorted(seen) == [j for j in range(45) if expected[i][j]]  # sorted: duplicates would show


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, n), generator=torch.Generator().manual_seed(seed))


SEPS = torch.tensor([5, 9, 17, 40, 41, 77])  # about 1 token in 15 is a separator


def _logits(model, ids, kernel, mask="sepllm", n_initial=2, n_recent=6):
    hook = training_hook(ids, SEPS, mask, n_initial, n_recent, kernel)
    return model(input_ids=ids, use_cache=False, **({} if hook is None else {HOOK_KWARG: hook})).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_forward_equals_dense_masked_sdpa(family):
    """FlexAttention's block mask computes what the dense boolean mask computes, on each family (CPU: forward)."""
    model = tiny_model(family, layers=2, dtype=torch.float32)
    ids = _ids(150)  # more than one 128-block: skipped and partial blocks both occur
    with torch.no_grad():
        dense, flex, plain, full = (
            _logits(model, ids, "sdpa"),
            _logits(model, ids, "flex"),
            _logits(model, ids, "flex-mask"),
            _logits(model, ids, "sdpa", mask="full"),
        )
    torch.testing.assert_close(flex, dense, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(plain, dense, atol=2e-4, rtol=1e-4)
    assert (dense - full).abs().max() > 1e-2  # the mask changed the result: the comparison is not vacuous


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="PyTorch's FlexAttention has no backward on CPU; runs on CUDA"
)
@pytest.mark.parametrize("family", FAMILIES)
def test_flex_gradients_equal_dense_masked_sdpa(family):
    model = tiny_model(family, layers=2, dtype=torch.float32).cuda()
    ids = _ids(300).cuda()
    grads = {}
    for kernel in KERNELS:
        model.zero_grad()
        _logits(model, ids, kernel).float().logsumexp(-1).mean().backward()
        grads[kernel] = [p.grad.clone() for p in model.parameters()]
    for kernel in ("flex", "flex-mask"):
        for gf, gd in zip(grads[kernel], grads["sdpa"]):
            torch.testing.assert_close(gf, gd, atol=2e-4, rtol=2e-3)


def test_a_masked_out_key_gets_no_gradient_from_the_query_that_must_not_see_it():
    model = tiny_model("llama", layers=1, dtype=torch.float32)
    ids = _ids(40)[:1]
    ids[0, 10] = 5  # a separator far from query 30
    is_sep = torch.isin(ids[0], SEPS)
    n_initial, n_recent, query = 2, 6, 30
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def grad(mask):
        emb.grad = None
        hook = training_hook(ids, SEPS, mask, n_initial, n_recent, "sdpa")
        extra = {} if hook is None else {HOOK_KWARG: hook}
        model(inputs_embeds=emb, use_cache=False, **extra).logits[0, query].sum().backward()
        return emb.grad[0].abs().sum(-1)  # [n]: how much each key position moves query 30's logits

    g = grad("sepllm")
    hidden = [j for j in range(query) if not (j < n_initial or is_sep[j] or j >= query - n_recent)]
    seen = [j for j in range(query) if j not in hidden]
    assert hidden and 10 in seen and 0 in seen
    assert g[hidden].max() == 0  # exactly zero: no path from a hidden key to this query
    assert (g[seen] > 0).all()
    assert (grad("full")[hidden] > 0).all()  # full attention does reach them


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama with the byte tokenizer saved as a model folder, and train/eval text files."""
    tok = byte_tokenizer()
    model = tiny_model(
        "llama",
        layers=2,
        hidden=32,
        heads=4,
        kv_heads=2,
        vocab=len(tok),
        max_pos=512,
        ids={"eos_token_id": tok.eos_token_id},
    )
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(TEXT * 6)
    (data / "b.txt").write_text(TEXT[::-1] * 3)
    (tmp_path / "eval.txt").write_text(TEXT * 3)
    return tmp_path


def _config(root: Path, out: str, **kw) -> TrainConfig:
    base = dict(
        model=str(root / "model"),
        out=str(root / out),
        data=[str(root / "data")],
        eval_data=[str(root / "eval.txt")],
        seq_len=64,
        batch_size=2,
        steps=12,
        lr=5e-3,
        warmup=2,
        n_initial=2,
        n_recent=8,
        eval_every=6,
        eval_batches=2,
        save_every=100,
        device="cpu",
    )
    return TrainConfig(**(base | kw))


def test_training_under_the_mask_lowers_the_loss_and_evaluates_both_ways(tiny_folder):
    res = train(_config(tiny_folder, "out"))
    assert res.step == 12 and len(res.losses) == 12 and not res.interrupted
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.5
    first, last = res.evals[0], res.evals[-1]
    assert [e["step"] for e in res.evals] == [0, 6, 12]
    assert last["loss_mask"] < first["loss_mask"] - 0.5
    assert first["loss_mask"] != first["loss_full"]  # held-out loss under the mask and under full attention
    log = [json.loads(line) for line in (tiny_folder / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 for r in log if r["event"] == "train")
    model, tok = tokensieve.load_model(str(tiny_folder / "out"), device="cpu")
    assert model.config.num_hidden_layers == 2
    assert torch.equal(separator_token_ids(tok), separator_token_ids(byte_tokenizer()))


def test_a_full_attention_run_is_evaluated_under_both_rules_too(tiny_folder):
    a = train(_config(tiny_folder, "full", mask="full", steps=2, eval_every=2))
    b = train(_config(tiny_folder, "sep", mask="sepllm", steps=2, eval_every=2))
    assert a.evals[0] == b.evals[0] | {"step": 0}  # the same model before training, the same two numbers
    assert all(e["loss_mask"] != e["loss_full"] for e in a.evals)
    assert a.losses[0] != b.losses[0]  # the first step's loss: one under full attention, one under the mask


@pytest.mark.parametrize("lora", [{}, {"lora_rank": 4, "lora_targets": "attn+mlp"}], ids=["full", "lora"])
def test_interrupted_then_resumed_run_gives_exactly_the_uninterrupted_weights(tiny_folder, lora):
    train(_config(tiny_folder, "whole", steps=6, grad_accum=2, **lora))

    def stop_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    part = train(_config(tiny_folder, "split", steps=6, grad_accum=2, **lora), on_step=stop_at_3)
    assert part.interrupted and part.step == 3
    assert (tiny_folder / "split" / "checkpoint" / "model.safetensors").is_file()
    assert (tiny_folder / "split" / "checkpoint" / "adapter.safetensors").is_file() == bool(lora)
    with pytest.raises(InputError, match="already holds a checkpoint"):
        train(_config(tiny_folder, "split", steps=6, grad_accum=2, **lora))
    rest = resume(tiny_folder / "split")
    assert rest.step == 6 and len(rest.losses) == 3
    a, _ = tokensieve.load_model(str(tiny_folder / "whole"), device="cpu")
    b, _ = tokensieve.load_model(str(tiny_folder / "split"), device="cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    log = [json.loads(line) for line in (tiny_folder / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(1, 7))
    if lora:  # the adapters and their optimizer state too, bit for bit
        from safetensors.torch import load_file

        ad_a, ad_b = (load_file(tiny_folder / r / "checkpoint" / "adapter.safetensors") for r in ("whole", "split"))
        assert ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
        st_a, st_b = (
            torch.load(tiny_folder / r / "checkpoint" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
            for r in ("whole", "split")
        )
        assert st_a.keys() == st_b.keys() and len(st_a) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
        for k in st_a:
            assert all(torch.equal(st_a[k][n], st_b[k][n]) for n in ("exp_avg", "exp_avg_sq")), k


def test_lora_post_training_trains_the_adapter_only_and_saves_the_merged_model(tiny_folder):
    from safetensors.torch import load_file

    full = train(_config(tiny_folder, "full", steps=2))
    res = train(_config(tiny_folder, "lora", lora_rank=4, lora_alpha=8.0, lr=2e-2))
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.5 and res.evals[-1]["loss_mask"] < res.evals[0]["loss_mask"]
    hidden, kv = 32, 16  # tiny_folder: 4 heads of 8, 2 KV heads
    assert res.trainable_parameters == 2 * 4 * ((hidden + hidden) * 2 + (hidden + kv) * 2)
    assert res.trainable_parameters < full.trainable_parameters / 10
    original = load_file(tiny_folder / "model" / "model.safetensors")
    base = load_file(tiny_folder / "lora" / "checkpoint" / "model.safetensors")
    assert base.keys() == original.keys() and all(torch.equal(base[k], original[k]) for k in base)  # frozen base
    merged, tok = tokensieve.load_model(str(tiny_folder / "lora"), device="cpu")
    sd = merged.state_dict()
    assert not any("lora" in k for k in sd)
    changed = {k for k in original if not torch.equal(sd[k], original[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in changed
    )
    # the merged model scores the held-out text as the adapted model did at the last evaluation
    from tokensieve.training.trainer import _rows, evaluate

    cfg = _config(tiny_folder, "lora", lora_rank=4)
    rows = _rows(cfg.eval_data, tok, cfg, "--eval-data", print)
    again = evaluate(merged, rows, cfg, "sdpa", separator_token_ids(tok), "cpu")
    for key in ("loss_mask", "loss_full"):
        assert again[key] == pytest.approx(res.evals[-1][key], abs=1e-4), key
    (tiny_folder / "lora" / "checkpoint" / "adapter.safetensors").unlink()
    with pytest.raises(InputError, match="holds no adapter.safetensors"):
        resume(tiny_folder / "lora", steps=14)


def test_config_bounds_are_checked():
    for kw, needle in [
        (dict(steps=0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(seq_len=4), "seq_len"),
        (dict(mask="window"), "mask"),
        (dict(kernel="cuda"), "kernel"),
        (dict(data=[]), "data"),
        (dict(hidden=30, heads=4), "multiple"),
        (dict(n_recent=-1), "n_recent"),
        (dict(lora_rank=1025), "lora_rank"),
        (dict(lora_rank=4, lora_alpha=-1.0), "lora_alpha"),
        (dict(lora_targets="all"), "lora_targets"),
        (dict(lora_rank=4, from_scratch=True), "from_scratch"),
    ]:
        with pytest.raises(InputError, match=needle):
            TrainConfig(**(dict(data=["x.txt"]) | kw)).check()


def test_cli_trains_writes_a_loadable_model_and_resumes(tiny_folder, capsys):
    out = tiny_folder / "cli"
    argv = [
        "train",
        "--model",
        str(tiny_folder / "model"),
        "--data",
        str(tiny_folder / "data"),
        "--eval-data",
        str(tiny_folder / "eval.txt"),
        "--out",
        str(out),
        "--steps",
        "3",
        "--seq-len",
        "64",
        "--n-recent",
        "8",
        "--eval-every",
        "3",
        "--save-every",
        "2",
        "--device",
        "cpu",
        "--quiet",
        "--json",
    ]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["step"] == 3 and summary["evals"][-1]["step"] == 3
    code, stdout, err = run_cli(["train", "--resume", str(out), "--steps", "5", "--quiet", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["step"] == 5
    model, tok = tokensieve.load_model(str(out), device="cpu")
    res = tokensieve.generate(model, tok, TEXT, method="sepllm", max_new_tokens=3, n_recent=8)
    assert res.prompt_tokens == len(TEXT.encode()) and len(res.token_ids) == 3


def test_cli_from_scratch_builds_the_asked_shape(tiny_folder, capsys):
    out = tiny_folder / "scratch"
    code, _, err = run_cli(
        [
            "train",
            "--from-scratch",
            "--layers",
            "1",
            "--hidden",
            "48",
            "--heads",
            "3",
            "--model",
            str(tiny_folder / "model"),
            "--data",
            str(tiny_folder / "data"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (1, 48, 3)
    assert config["vocab_size"] == len(byte_tokenizer())


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "--out and --data are required"),
        (["--data", "nowhere.txt", "--out", "o"], "does not exist"),
        (["--steps", "0"], "expected an integer >= 1"),
        (["--kernel", "flex", "--device", "cpu"], "GPU only"),
        (["--seq-len", "4k"], "exceeds the model's 512 positions"),
        (["--lr", "2"], "lr must be a number in (0, 1]"),
        (["--from-scratch", "--lora-rank", "4"], "lora_rank 4 with from_scratch"),
        (["--lora-rank", "2000"], "lora_rank must be an integer in [0, 1024]"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "lora_alpha must be"),
        (["--lora-rank", "20"], "exceeds the smallest adapted projection's side (16)"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tiny_folder, capsys, extra, needle):
    base = ["train", "--model", str(tiny_folder / "model"), "--quiet"]
    if extra and extra[0] != "--data":
        base += ["--data", str(tiny_folder / "data"), "--out", str(tiny_folder / "bad")]
    code, _, err = run_cli(base + extra, capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_resume_of_a_folder_without_checkpoint_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and "holds no training checkpoint" in err


def test_cli_choices_are_the_trainers():
    from tokensieve.commands.train import KERNEL_CHOICES, LORA_TARGET_CHOICES, MASK_CHOICES
    from tokensieve.training.lora import TARGETS

    assert set(KERNEL_CHOICES) == set(KERNELS) and set(MASK_CHOICES) == set(MASKS)
    assert set(LORA_TARGET_CHOICES) == set(TARGETS)


def test_cli_trains_a_lora_adapter_resumes_it_and_the_merged_model_loads(tiny_folder, capsys):
    out = tiny_folder / "cli-lora"
    argv = ["train", "--model", str(tiny_folder / "model"), "--data", str(tiny_folder / "data"), "--out", str(out)]
    argv += ["--steps", "2", "--seq-len", "64", "--n-recent", "8", "--device", "cpu", "--quiet", "--json"]
    code, stdout, err = run_cli(argv + ["--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "attn+mlp"], capsys)
    assert code == 0, err
    first = json.loads(stdout)
    hidden, kv, mlp = 32, 16, 64  # tiny_folder: MLP 2 x hidden
    per_layer = 2 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + mlp) * 3)
    assert first["step"] == 2 and first["trainable_parameters"] == 2 * per_layer
    code, stdout, err = run_cli(["train", "--resume", str(out), "--steps", "3", "--quiet", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["step"] == 3 and json.loads(stdout)["trainable_parameters"] == 2 * per_layer
    cfg = json.loads((out / "checkpoint" / "train_config.json").read_text())
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"]) == (2, 4.0, "attn+mlp")
    model, tok = tokensieve.load_model(str(out), device="cpu")
    assert not any("lora" in k for k in model.state_dict())
    res = tokensieve.generate(model, tok, TEXT, method="sepllm", max_new_tokens=2, n_recent=8)
    assert len(res.token_ids) == 2


def test_batches_depend_only_on_their_index_and_cover_every_row_once_per_epoch():
    from tokensieve.training.data import Batches, pack

    rows = pack(torch.arange(70), 7)  # 10 rows
    a, b = Batches(rows, 3, seed=4), Batches(rows, 3, seed=4)
    later = [b(k).clone() for k in (5, 2, 0)]  # another order, another epoch first
    assert all(torch.equal(a(k), x) for k, x in zip((5, 2, 0), later))
    first_epoch = torch.cat([a(k) for k in range(3)] + [a(3)[:1]])[:, 0] // 7  # rows 0..9 of epoch 0
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert not torch.equal(Batches(rows, 3, seed=5)(0), a(0))


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    from tokensieve.training import lr_at

    cfg = TrainConfig(data=["x"], steps=20, warmup=4, lr=1e-3)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(x >= y for x, y in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, cfg) == pytest.approx(1e-4)


def test_default_kernel_is_dense_below_the_measured_crossover():
    from tokensieve.training.trainer import FLEX_FROM_LENGTH, default_kernel

    assert default_kernel("cpu", 1 << 17) == "sdpa"  # no FlexAttention backward on the CPU
    assert default_kernel("cuda", FLEX_FROM_LENGTH - 1) == "sdpa"
    assert default_kernel("cuda", FLEX_FROM_LENGTH) == "flex"
    assert default_kernel("cuda:1", 1 << 17) == "flex"


def test_train_help_states_the_default_kernels_threshold(capsys):
    from tokensieve.training.trainer import FLEX_FROM_LENGTH

    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    assert f"--seq-len >= {FLEX_FROM_LENGTH}" in " ".join(out.split())
