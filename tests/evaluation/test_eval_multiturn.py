"""Multi-turn task: generated conversations, prompts that carry the earlier turns, the prefix cache per turn,
resume; LazyLLM's revivals per decoding step on every generation task's lines."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_model
from eval_support import TEXT, byte_model, byte_tokenizer

from tokensieve.engine.runner import encode_prompt, generate
from tokensieve.errors import InputError
from tokensieve.evaluation.harness import (
    REVIVAL_FIELDS,
    RevivalProbe,
    cell_id,
    read_results,
    revival_fields,
    run_eval,
    run_generation,
)
from tokensieve.evaluation.multiturn import FACT_KINDS, MultiTurnTask, turn_messages
from tokensieve.evaluation.ruler import RulerTask
from tokensieve.methods import LazyLLM, make_method

torch.set_num_threads(1)

LENGTH = 1200


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return byte_model()


def task(seed=0, samples=2, lengths=(LENGTH,), **kw):
    kw.setdefault("max_new_tokens", 4)
    return MultiTurnTask(TEXT, list(lengths), samples=samples, seed=seed, **kw)


def test_samples_deterministic_for_a_seed_and_differ_across_seeds(tok):
    a = list(task(seed=3).samples(tok))
    b = list(task(seed=3).samples(tok))
    c = list(task(seed=4).samples(tok))
    assert [s.key for s in a] == [f"{LENGTH}/0", f"{LENGTH}/1"]
    for x, y in zip(a, b):
        assert (x.input_ids, x.expected, x.meta, x.questions, x.document) == (
            y.input_ids,
            y.expected,
            y.meta,
            y.questions,
            y.document,
        )
    for x, z in zip(a, c):
        assert x.key == z.key and set(x.expected).isdisjoint(z.expected) and x.questions != z.questions
    assert set(a[0].expected).isdisjoint(a[1].expected)  # two conversations of one seed differ too
    # the facts do not depend on the length (only the haystack around them grows)
    long = next(iter(task(seed=3, samples=1, lengths=(2 * LENGTH,)).samples(tok)))
    assert long.expected == a[0].expected and long.meta["depths"] == a[0].meta["depths"]


def test_facts_at_distinct_depths_and_answers_in_the_document(tok):
    for s in task(seed=1, samples=3, turns=5).samples(tok):
        facts = s.meta["facts"]
        assert len(facts) == 5 and sorted({f["kind"] for f in facts}) == sorted(FACT_KINDS)
        depths = [f["depth"] for f in facts]
        assert depths == sorted(depths) and len(set(depths)) == 5
        for i, d in enumerate(depths):  # one fact per fifth of the document
            assert i / 5 < d < (i + 1) / 5
        positions = [f["position"] for f in facts]  # where the statements really are (share of the characters)
        assert positions == sorted(positions) and len(set(positions)) == 5
        assert all(abs(p - d) < 0.1 for p, d in zip(positions, depths))
        prompt = tok.decode(s.input_ids)
        assert s.document in prompt and prompt.rstrip().endswith(s.questions[0])
        for f in facts:  # each answer is in the document, once, and in no other fact
            assert s.document.count(f["answer"]) == 1 and f["subject"] in s.document
        # turn t asks the fact order[t]; its subject is in the question, its answer is the expected one
        assert sorted(s.meta["order"]) == list(range(5))
        for t, i in enumerate(s.meta["order"]):
            assert facts[i]["subject"] in s.questions[t] and s.expected[t] == facts[i]["answer"]
            assert facts[i]["answer"] not in s.questions[t]
        assert LENGTH - 150 < len(s.input_ids) <= LENGTH


def test_too_short_for_the_facts():
    with pytest.raises(InputError, match="distinct depths"):
        list(MultiTurnTask(TEXT, [700], samples=1, turns=5).samples(byte_tokenizer()))
    with pytest.raises(InputError, match="too short"):
        list(MultiTurnTask(TEXT, [180], samples=1, turns=5).samples(byte_tokenizer()))
    with pytest.raises(InputError, match="sentences"):
        MultiTurnTask("One sentence. Two sentences.", [512], turns=5)


def test_turn_prompt_contains_the_earlier_turns(tok):
    s = next(iter(task(seed=2, samples=1).samples(tok)))
    answers = ["first answer 11", "second answer 22", "third answer 33", "fourth answer 44"]
    prev = None
    for t in range(5):
        msgs = turn_messages(s.document, s.questions, answers[:t])
        assert [m["role"] for m in msgs] == ["user"] + ["assistant", "user"] * t
        text = tok.decode(encode_prompt(tok, msgs)[0].tolist())
        assert s.document in text and text.rstrip().endswith(f"Question: {s.questions[t]}")
        for q, a in zip(s.questions[:t], answers[:t]):  # every earlier question and answer, in order
            assert q in text and a in text and text.index(q) < text.index(a)
        assert all(q not in text for q in s.questions[t + 1 :])
        if prev is not None:  # turn t's prompt extends turn t-1's (which the prefix cache can reuse)
            assert text.startswith(prev.rstrip())
        prev = text
    with pytest.raises(ValueError):
        turn_messages(s.document, s.questions, answers + ["fifth"])


def _run(model, tok, out, t=None, methods=("full",), **kw):
    seen = []
    path = run_eval(model, tok, t or task(), list(methods), out, "tiny", progress=False, on_row=seen.append, **kw)
    return path, seen


def test_run_writes_lines_and_resumes(model, tok, tmp_path):
    path, first = _run(model, tok, tmp_path, methods=("full", "lazyllm"))
    rows = read_results(path)
    assert path.name == "multiturn.jsonl" and len(rows) == len(first) == 2 * 2
    for r in rows:
        assert r["task"] == "multiturn" and r["task_config"]["seed"] == 0 and r["task_config"]["turns"] == 5
        turns = r["turns"]
        assert [t["turn"] for t in turns] == [1, 2, 3, 4, 5] and r["expected"] == [t["expected"] for t in turns]
        assert r["score"] == pytest.approx(sum(t["score"] for t in turns) / 5) and r["turn_scores"] == [
            t["score"] for t in turns
        ]
        assert r["answers"] == [t["answer"] for t in turns]
        assert (
            r["ttft_s"] == pytest.approx(sum(t["ttft_s"] for t in turns) / 5)
            and r["ttft_s_first"] == turns[0]["ttft_s"]
        )
        assert r["prompt_tokens"] == turns[-1]["prompt_tokens"] and r["cached_tokens"] == sum(
            t["cached_tokens"] for t in turns
        )
        for t in turns:
            assert {"ttft_s", "cached_tokens", "kept_tokens", "prompt_tokens"} <= set(t) and t["ttft_s"] > 0
        # each turn's prompt is the conversation so far: re-encoding the recorded answers gives its size
        s = {x.key: x for x in task().samples(tok)}[r["key"]]
        for i, t in enumerate(turns):
            ids = encode_prompt(tok, turn_messages(s.document, s.questions, r["answers"][:i]))
            assert t["prompt_tokens"] == ids.shape[1]
        assert turns[0]["prompt_tokens"] == len(s.input_ids)
    # a second run has nothing to do
    assert _run(model, tok, tmp_path, methods=("full", "lazyllm"))[1] == []
    # a crash while writing the last line: only that cell runs again, with the same answers
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    _, redone = _run(model, tok, tmp_path, methods=("full", "lazyllm"))
    assert [cell_id(r) for r in redone] == [cell_id(first[3])]
    assert redone[0]["answers"] == first[3]["answers"]
    assert len({cell_id(r) for r in read_results(path)}) == 4


def test_prefix_cache_reused_from_turn_two_and_same_answers(model, tok, tmp_path):
    methods = ("full", make_method("snapkv", budget=256, window_size=16))
    _, cached = _run(model, tok, tmp_path / "cached", methods=methods)
    _, plain = _run(model, tok, tmp_path / "plain", t=task(prefix_cache_gib=0), methods=methods)
    assert len(cached) == len(plain) == 4
    for c, p in zip(cached, plain):
        assert (c["key"], c["method"]) == (p["key"], p["method"])
        assert c["prefix_reused"] is True and c["prefix_note"] is None
        assert p["prefix_reused"] is False and "off" in p["prefix_note"]
        assert c["answers"] == p["answers"]  # float32, greedy: the cache changes nothing but the work done
        ct = c["turns"]
        assert ct[0]["cached_tokens"] == 0 and ct[0]["stored_tokens"] > 0.8 * ct[0]["prompt_tokens"]
        for i in range(1, 5):
            # as the server does, a turn stores its prompt up to its question's line; the next turn reuses all of it
            # (the document and every turn before the previous one) and computes the previous question and answer
            assert ct[i]["cached_tokens"] == ct[i - 1]["stored_tokens"] < ct[i - 1]["prompt_tokens"]
            assert ct[i - 1]["prompt_tokens"] < ct[i]["stored_tokens"] < ct[i]["prompt_tokens"]
            if i >= 2:
                assert ct[i]["cached_tokens"] > ct[i - 2]["prompt_tokens"]
        assert all(t["cached_tokens"] == 0 for t in p["turns"])
        assert [t["prompt_tokens"] for t in ct] == [t["prompt_tokens"] for t in p["turns"]]


def test_method_the_cache_refuses_runs_without_it(model, tok, tmp_path):
    _, rows = _run(model, tok, tmp_path, t=task(samples=1), methods=("lazyllm", "streamingllm"))
    for r in rows:
        assert r["prefix_reused"] is False and r["method"] in r["prefix_note"] and r["cached_tokens"] == 0
        assert r["score"] is not None and len(r["turns"]) == 5


# ----- LazyLLM's revivals per decoding step -------------------------------------------------------------------
GEMMA_TYPES = ["sliding_attention", "full_attention"] * 3


def _lazy_model(family: str, eos: int | None = None):
    m = tiny_model(family, layers=6, init=0.2, sliding_window=12, layer_types=GEMMA_TYPES)
    m.generation_config.eos_token_id = eos
    return m


def _reference_per_step(model, method, prompt, fed):
    """Eager LazyLLM fed the same tokens: the revived (token, layer) entries of each decoding step."""
    with torch.inference_mode():
        st = method.prefill(model, prompt)
        counts, before = [], st.revived_computations
        assert before == 0
        for t in fed:
            method.step(model, st, torch.tensor([[t]]))
            counts.append(st.revived_computations - before)
            before = st.revived_computations
    return counts, st


@pytest.mark.parametrize("family,stop", [("llama", False), ("llama", True), ("gemma3", False)])
def test_revivals_per_step_match_an_eager_count(family, stop):
    """llama decodes on LazyLLM's static decoder, gemma3 (sliding layers) on its eager path; `stop` ends the
    answer at an end-of-sequence token (which ``on_token`` never sees)."""
    from conftest import TinyTokenizer

    tok = TinyTokenizer()
    prompt = torch.randint(3, 96, (1, 60), generator=torch.Generator().manual_seed(4))
    layers = (1, 3) if family == "gemma3" else (1, 2, 4)
    lazy = LazyLLM(prune_layers=layers, keep_fractions=(0.5,) * len(layers))
    model = _lazy_model(family)
    eos = None
    if stop:  # stop at a token the free run chooses at step 9 (and not before)
        free = generate(model, tok, prompt, lazy, max_new_tokens=16)
        eos = next(t for i, t in enumerate(free.token_ids) if i >= 8 and t not in free.token_ids[:i])
        model.generation_config.eos_token_id = eos
    probe = RevivalProbe(model, lazy)
    res = generate(model, tok, prompt, probe.method, max_new_tokens=16, on_token=probe.on_token, decoders=probe.pool)
    assert res.details["decode_path"] == ("eager" if family == "gemma3" else "static")
    if stop:
        assert res.token_ids[-1] == eos and res.generated_tokens < 16
    per_step = probe.per_step(res)
    steps = res.generated_tokens - 1
    ref, st = _reference_per_step(
        model, LazyLLM(prune_layers=layers, keep_fractions=(0.5,) * len(layers)), prompt, res.token_ids[:steps]
    )
    assert sum(ref) > 0 and sum(x > 0 for x in ref) >= 2, "the run should revive tokens in several steps"
    assert per_step == ref and len(per_step) == steps
    fields = revival_fields(per_step, res.details)
    assert fields == {
        "revived_per_step_mean": sum(ref) / steps,
        "revived_per_step_max": max(ref),
        "revived_total": sum(ref),
        "revived_tokens": int(st.revived.sum()),
        "revival_steps": sum(x > 0 for x in ref),
        "decode_steps": steps,
    }
    # what every generation task records: the same fields from run_generation, none for other methods
    res2, extra = run_generation(model, tok, prompt[0].tolist(), lazy, 16, False)
    assert res2.token_ids == res.token_ids and extra == fields
    assert run_generation(model, tok, prompt[0].tolist(), make_method("full"), 4, False)[1] == {}


def test_lazyllm_lines_carry_the_revival_fields(model, tok, tmp_path):
    lazy = make_method("lazyllm", prune_layers=(0, 1), keep_fractions=(0.5, 0.5))
    ruler = RulerTask([LENGTH], samples=1, seed=0, tasks=["niah_single"], haystack=TEXT, max_new_tokens=6)
    _, rows = _run(model, tok, tmp_path, t=ruler, methods=("full", lazy))
    _, mt = _run(model, tok, tmp_path, t=task(samples=1, max_new_tokens=6), methods=("full", lazy))
    for r in rows + mt:
        if r["method"] == "full":
            assert not set(REVIVAL_FIELDS) & set(r)
            continue
        assert set(REVIVAL_FIELDS) <= set(r)
        assert r["revived_total"] > 0 and r["decode_steps"] == r["generated_tokens"] - len(r.get("turns") or [0])
        assert r["revived_per_step_mean"] == pytest.approx(r["revived_total"] / r["decode_steps"])
        assert r["revived_per_step_max"] >= r["revived_per_step_mean"] and r["revival_steps"] >= 1
    m = next(r for r in mt if r["method"] == "lazyllm")
    for key in ("revived_total", "decode_steps", "revival_steps", "revived_tokens"):
        assert m[key] == sum(t[key] for t in m["turns"])
    assert m["revived_per_step_max"] == max(t["revived_per_step_max"] for t in m["turns"])
    json.dumps(m)  # plain JSON


# ----- command line ----------------------------------------------------------------------------------------------
def test_cli_bad_values_exit_2(capsys):
    from tokensieve.cli import main

    for argv, needle in (
        (["--turns", "0"], "--turns"),
        (["--prefix-cache-gib", "-1"], "--prefix-cache-gib"),
        (["--prefix-cache-gib", "x"], "'x'"),
        (["--samples", "0"], "--samples"),
        (["--seed", "q"], "--seed"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "multiturn", *argv, "--model", "/nonexistent/model"])
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            exc.value.code == 2
            and len(err) == 1
            and err[0].startswith("tokensieve eval multiturn: error:")
            and needle in err[0]
        )


def test_cli_help_lists_the_options(capsys):
    from tokensieve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "multiturn", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for opt in ("--turns", "--seed", "--samples", "--lengths", "--prefix-cache-gib", "--haystack", "--methods"):
        assert re.search(rf"^\s+{opt}\b", out, re.M), opt


def test_cli_runs_and_resumes(tmp_path, capsys):
    from eval_support import save_model_dir

    from tokensieve.cli import main

    d = save_model_dir(tmp_path / "m")
    argv = [
        "eval",
        "multiturn",
        "--model",
        str(d),
        "--haystack",
        str(d / "hay.txt"),
        "--lengths",
        "700",
        "--samples",
        "1",
        "--turns",
        "3",
        "--max-new-tokens",
        "3",
        "--methods",
        "full",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--no-plots",
    ]
    assert main(argv) == 0
    rows = read_results(tmp_path / "out" / "multiturn.jsonl")
    assert len(rows) == 1 and len(rows[0]["turns"]) == 3 and rows[0]["task_config"]["prefix_cache_gib"] == 1.0
    assert "multiturn" in capsys.readouterr().out
    assert main(argv) == 0 and len(read_results(tmp_path / "out" / "multiturn.jsonl")) == 1


# ----- real weights -----------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_smollm2_prefix_cache_same_answers(smollm2, tmp_path):
    model, tok = smollm2
    t = MultiTurnTask(TEXT, [512], samples=1, seed=0, turns=3, max_new_tokens=12)
    (c,) = _run(model, tok, tmp_path / "a", t=t)[1]
    (p,) = _run(
        model,
        tok,
        tmp_path / "b",
        t=MultiTurnTask(TEXT, [512], samples=1, seed=0, turns=3, max_new_tokens=12, prefix_cache_gib=0),
    )[1]
    assert c["prefix_reused"] and not p["prefix_reused"]
    assert c["answers"] == p["answers"] and all(a.strip() for a in c["answers"])
    assert c["turns"][0]["cached_tokens"] == 0 and all(x["cached_tokens"] > 400 for x in c["turns"][1:])
    text = tok.decode(encode_prompt(tok, turn_messages("DOC", ["q1", "q2"], ["a1"]))[0])
    assert "<|im_start|>assistant\na1<|im_end|>" in text  # the earlier answer is an assistant turn of the chat


@pytest.mark.real_model
def test_smollm2_lazyllm_revivals(smollm2, tmp_path):
    model, tok = smollm2
    t = MultiTurnTask(TEXT, [512], samples=1, seed=0, turns=2, max_new_tokens=16)
    (r,) = _run(model, tok, tmp_path, t=t, methods=(make_method("lazyllm", keep_fractions=(0.5, 0.5, 0.5)),))[1]
    assert set(REVIVAL_FIELDS) <= set(r) and r["decode_steps"] > 0
    assert (
        r["revived_total"]
        == sum(x["revived_total"] for x in r["turns"])
        == r["details"]["revived_kv_computations"] + sum(x["revived_total"] for x in r["turns"][:-1])
    )
