"""Runner, method registry, model loading and CLI errors."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

import tokensieve
from tokensieve import cli
from tokensieve.methods.base import cache_stats


def test_full_generation_matches_plain_greedy_loop(tok):
    model = tiny_model("llama")
    ids = random_ids(30)
    res = tokensieve.generate(model, tok, ids, method="full", max_new_tokens=6)
    cur = ids
    expect = []
    with torch.no_grad():
        for _ in range(6):
            nxt = model(cur).logits[0, -1].argmax()
            expect.append(int(nxt))
            cur = torch.cat([cur, nxt.view(1, 1)], dim=1)
    assert res.token_ids == expect
    assert res.prompt_tokens == 30 and res.kept_tokens == 30 and res.generated_tokens == 6
    assert res.kv_tokens_prefill == [30] * 6 and res.kv_tokens_final == [35] * 6
    assert res.ttft_s > 0 and res.decode_tokens_per_s > 0


def test_stops_at_eos(tok):
    model = tiny_model("llama")
    ids = random_ids(30)
    first = tokensieve.generate(model, tok, ids, max_new_tokens=5).token_ids
    model.generation_config.eos_token_id = first[2]
    res = tokensieve.generate(model, tok, ids, max_new_tokens=5)
    assert res.token_ids == first[: first.index(first[2]) + 1]
    assert len(res.token_ids) < 5


def test_cache_stats_counts_bytes():
    model = tiny_model("llama", layers=3)
    with torch.inference_mode():
        st = tokensieve.methods.FullAttention().prefill(model, random_ids(10))
    tokens, nbytes = cache_stats(st.cache)
    assert tokens == [10, 10, 10]
    # 3 layers x (K+V) x 2 kv heads x 10 tokens x 16 dims x 4 bytes
    assert nbytes == 3 * 2 * 2 * 10 * 16 * 4


def test_bad_inputs(tok):
    model = tiny_model("llama", max_pos=64)
    with pytest.raises(ValueError, match="empty"):
        tokensieve.generate(model, tok, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        tokensieve.encode_prompt(tok, "   ")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        tokensieve.generate(model, tok, random_ids(10), method="nope")
    with pytest.raises(ValueError, match="has no parameter"):
        tokensieve.generate(model, tok, random_ids(10), method="full", topk=3)
    with pytest.raises(tokensieve.PromptTooLongError, match="more than the model's maximum of 64"):
        tokensieve.generate(model, tok, random_ids(80))
    res = tokensieve.generate(model, tok, random_ids(80), allow_long=True, max_new_tokens=2)
    assert res.prompt_tokens == 80
    with pytest.raises(ValueError, match="max_new_tokens"):
        tokensieve.generate(model, tok, random_ids(10), max_new_tokens=0)


def test_unknown_model_gives_one_clear_message(tmp_path):
    with pytest.raises(tokensieve.ModelLoadError, match="not an embedded model"):
        tokensieve.load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(tokensieve.ModelLoadError, match="missing.gguf does not exist"):
        tokensieve.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(tokensieve.ModelLoadError, match="no config.json"):
        tokensieve.load_model(str(tmp_path))


def test_selection_text_marks_gaps():
    class T:
        def decode(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

    ids = list(range(10))
    assert tokensieve.selection_text(T(), ids, [0, 1, 4, 5, 9]) == "ab [...] ef [...] j"
    assert tokensieve.selection_text(T(), ids, [2, 3]) == " [...] cd [...] "


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert cli.main(["ask", "--file", str(empty), "--question", "q"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert cli.main(["ask", "--file", str(tmp_path / "nope.txt"), "--question", "q"]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    assert cli.main(["ask", "--file", str(doc), "--question", "q", "--model", "not-a-model-xyz"]) == 2
    assert "not an embedded model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["ask", "--file", str(doc), "--question", "q", "--method", "bogus"])
    with pytest.raises(SystemExit):
        cli.main(["ask", "--file", str(doc), "--question", "q", "--topk", "0"])


def test_cli_help_for_every_command(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(cli.COMMAND_MODULES) <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_step_times_recorded_per_decoding_step(tok):
    model = tiny_model("llama")
    res = tokensieve.generate(model, tok, random_ids(20), max_new_tokens=5)
    assert len(res.step_times_s) == 4 and all(t > 0 for t in res.step_times_s)


def test_embedded_copy_survives_two_processes_writing_it(tmp_path):
    """Parallel first loads of an embedded model both write the dequantized copy; the second must not fail."""
    from pathlib import Path

    from tokensieve.core.models import store_copy

    class Tok:
        def save_pretrained(self, d):
            Path(d, "tokenizer.json").write_text("{}")

    model = tiny_model("llama", layers=1)
    target = tmp_path / "smollm2"
    store_copy(model, Tok(), target)
    first = (target / "config.json").stat().st_mtime_ns
    store_copy(model, Tok(), target)  # the slower process finds the copy there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no leftover temporary folder
    assert (target / "config.json").stat().st_mtime_ns == first
    reloaded = type(model).from_pretrained(str(target))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.real_model
def test_cpu_peak_memory_is_at_least_the_kv_a_run_holds(smollm2):
    """A run after a larger one must still see its own allocations: peak >= the KV cache it holds.

    (Memory the first run freed sits in the C allocator and is reused without growing the process;
    PeakMemory returns it to the OS first. Without that, GemFilter's peak here read 0.7 MiB.)
    """
    model, tok = smollm2
    ids = torch.randint(5, 40000, (1, 1500), generator=torch.Generator().manual_seed(0))
    tokensieve.generate(model, tok, ids, "full", max_new_tokens=2)
    res = tokensieve.generate(model, tok, ids, "gemfilter", topk=1024, max_new_tokens=2)
    assert res.kv_bytes_prefill > 0 and res.peak_memory_bytes >= res.kv_bytes_prefill, (
        res.peak_memory_bytes,
        res.kv_bytes_prefill,
    )


def test_a_prepared_prompt_runs_as_it_is_without_a_second_preparation(tok, monkeypatch):
    """generate / generate_batch take a runner.Prepared and do not prepare it again (the server prepares each
    request once, when it arrives); the answer equals the one from the prompt itself."""
    from tokensieve.engine.runner import generate, generate_batch, prepare
    from tokensieve.methods.snapkv import SnapKV

    model = tiny_model("llama")
    ids = [random_ids(30, seed=s) for s in (1, 2, 3)]
    params = {"budget": 12, "window_size": 4}
    alone = [generate(model, tok, x, method="snapkv", max_new_tokens=5, **params).token_ids for x in ids]
    batch = [r.token_ids for r in generate_batch(model, tok, ids, method="snapkv", max_new_tokens=5, **params)]
    runs = [prepare(model, tok, x, "snapkv", **params) for x in ids]
    calls = []
    real = SnapKV.validate
    monkeypatch.setattr(SnapKV, "validate", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    assert [generate(model, tok, r, max_new_tokens=5).token_ids for r in runs] == alone
    assert [r.token_ids for r in generate_batch(model, tok, runs, max_new_tokens=5)] == batch
    assert calls == []  # nothing validated again
    with pytest.raises(tokensieve.InputError, match="carries its method"):
        generate(model, tok, runs[0], method="snapkv", budget=12)
    other = prepare(model, tok, ids[1], "snapkv", budget=16, window_size=4)
    with pytest.raises(tokensieve.InputError, match=r"prompt 1 was prepared for snapkv .*one set of parameters"):
        generate_batch(model, tok, [runs[0], other], max_new_tokens=2)
    with pytest.raises(tokensieve.InputError, match="h2o runs one prompt at a time"):
        generate_batch(model, tok, [prepare(model, tok, x, "h2o", budget=12) for x in ids[:2]], max_new_tokens=2)


def test_one_prompt_length_rule_and_message():
    from tokensieve.engine.runner import ALLOW_LONG_HINT, check_prompt_length
    from tokensieve.errors import PromptTooLongError

    check_prompt_length(64, 64)  # at the limit: fine
    check_prompt_length(10**9, None)  # no limit known
    with pytest.raises(PromptTooLongError) as e:
        check_prompt_length(65, 64, hint=ALLOW_LONG_HINT)
    assert str(e.value) == (
        "prompt has 65 tokens, more than the model's maximum of 64 positions; shorten it "
        "or pass allow_long=True (--allow-long) to run anyway"
    )
    with pytest.raises(
        PromptTooLongError,
        match=r"^prompt has at least 70 tokens \(700 characters\), more than the model's "
        r"maximum of 64 positions; shorten it$",
    ):
        check_prompt_length(70, 64, at_least="700 characters")


@pytest.mark.parametrize(
    "method, params, kv",
    [
        ("full", {}, 40),
        ("snapkv", {"budget": 16, "window_size": 4}, 16),
        ("streamingllm", {"budget": 12, "n_initial": 4}, 12),
        ("gemfilter", {"topk": 10, "filter_layer": 1}, 10),
    ],
)
def test_kv_kept_is_what_the_cache_holds_after_the_prefill(tok, method, params, kv):
    """``kept_tokens`` counts the prompt tokens computed on; ``kv_kept`` what the cache keeps of them (an evicting
    method computes on all 40 and keeps its budget), in the result and in its dict."""
    res = tokensieve.generate(tiny_model("llama"), tok, random_ids(40), method=method, max_new_tokens=2, **params)
    assert res.kv_kept == kv == max(res.kv_tokens_prefill) and res.to_dict()["kv_kept"] == kv
    assert res.kept_tokens == (10 if method == "gemfilter" else 40)


def test_kv_kept_counts_the_fullest_layer_of_a_model_with_sliding_window_layers(tok):
    model = tiny_model("gemma3")
    res = tokensieve.generate(model, tok, random_ids(40), method="full", max_new_tokens=1)
    assert min(res.kv_tokens_prefill) < 40 == res.kv_kept  # sliding layers hold their window, global ones all 40
