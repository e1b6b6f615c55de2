"""`calibrate` (GemFilter filter layer) on a tiny model: recall per layer against a slow reference."""

from __future__ import annotations

import pytest
import torch
from eval_support import TEXT, byte_model, byte_tokenizer

from tokensieve.cli import main
from tokensieve.engine.runner import encode_prompt
from tokensieve.evaluation.calibrate import NEEDLES, SPAN_RULES, calibrate, span_label
from tokensieve.evaluation.needle import build_needle_prompt


@pytest.fixture(scope="module")
def setup():
    return byte_model(), byte_tokenizer()


def test_keep_everything_recalls_everything(setup):
    model, tok = setup
    cal = calibrate(model, tok, TEXT, [500], [0.0, 1.0], topk=10_000, progress=False)
    assert set(cal.recall) == {"paper", "window"}
    assert all(len(v) == 3 and all(x == 1.0 for x in v) for v in cal.recall.values())
    assert cal.best_layer == 0  # the earliest layer within tolerance of the best


def reference_paper_scores(model, ids):
    """Per layer: q_last . k_j summed over heads, with q and k recomputed by hand from the hidden states."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n = ids.shape[1]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # hs[l]: input of layer l, [1, n, d]
        cos, sin = model.model.rotary_emb(hs[0], torch.arange(n)[None])
        out = []
        for layer_idx, layer in enumerate(model.model.layers):
            attn, x = layer.self_attn, layer.input_layernorm(hs[layer_idx])
            hd = attn.head_dim
            q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)  # [1, hq, n, hd]
            k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)  # [1, hkv, n, hd]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [1, hq, n, hd]
            out.append((q[:, :, -1:, :] * k).sum(-1).sum(1)[0])  # [n]
    return out


def test_recall_matches_a_slow_reference(setup):
    model, tok = setup
    topk = 48
    cal = calibrate(model, tok, TEXT, [500], [0.5], topk=topk, scorings=("paper",), progress=False)
    p = build_needle_prompt(tok, TEXT, 500, 0.5)
    ids = encode_prompt(tok, p.messages)
    for layer, sc in enumerate(reference_paper_scores(model, ids)):
        pooled = torch.nn.functional.avg_pool1d(sc.view(1, 1, -1), 5, 1, 2).view(-1)  # the paper's pooling
        kept = pooled.topk(topk).indices
        ref = torch.isin(torch.tensor(p.needle_span), kept).float().mean().item()
        assert cal.recall["paper"][layer] == pytest.approx(ref, abs=1e-4)
    assert 0 <= cal.best_layer < 3 and cal.best_scoring == "paper"


def test_calibrate_command(setup, tmp_path, capsys):
    model, tok = setup
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "hay.txt").write_text(TEXT)
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tmp_path / "m"),
                "--lengths",
                "500",
                "--depths",
                "0.5",
                "--topk",
                "64",
                "--haystack",
                str(tmp_path / "hay.txt"),
                "--out",
                str(tmp_path / "cal.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "chosen: --filter-layer" in out and (tmp_path / "cal.json").exists()


def test_local_recall_is_what_local_gemfilter_keeps(setup):
    """calibrate's local recall per layer equals the recall of GemFilter(filter_attention="local",
    filter_layer=i).select, i.e. one forward with every layer local gives each r's local pass."""
    from tokensieve.methods.gemfilter import GemFilter

    model, tok = setup
    topk, w = 48, 40
    cal = calibrate(
        model,
        tok,
        TEXT,
        [500],
        [0.3, 0.7],
        topk=topk,
        scorings=("window", "paper"),
        progress=False,
        local_windows=[w, 100_000],
        n_initial=2,
    )
    assert cal.local_windows == [w, 100_000] and set(cal.local_recall) == {str(w), "100000"}
    assert cal.local_recall["100000"] == cal.recall  # a window covering the prompt is the dense pass
    for scoring in ("window", "paper"):
        for layer in range(3):
            recalls = []
            for i, depth in enumerate((0.3, 0.7)):
                text, question, _ = NEEDLES[i % len(NEEDLES)]  # calibrate takes its needles in turn
                p = build_needle_prompt(tok, TEXT, 500, depth, text, question)
                ids = encode_prompt(tok, p.messages)
                kept = GemFilter(
                    topk=topk,
                    filter_layer=layer,
                    scoring=scoring,
                    filter_attention="local",
                    n_initial=2,
                    n_recent=w,
                    dilation=1,
                ).select(model, ids)  # layer recall: the paper's rule
                recalls.append(torch.isin(torch.tensor(p.needle_span), kept).float().mean().item())
            assert cal.local_recall[str(w)][scoring][layer] == pytest.approx(sum(recalls) / 2, abs=1e-4)
    best = cal.recall[cal.best_scoring][cal.best_layer]
    ok = [x for x in (w, 100_000) if cal.local_recall[str(x)][cal.best_scoring][cal.best_layer] >= best - 0.02]
    assert cal.suggested_window == min(ok)


def test_local_recall_differs_from_dense_with_a_small_window(setup):
    model, tok = setup
    cal = calibrate(
        model, tok, TEXT, [500], [0.5], topk=48, scorings=("window",), progress=False, local_windows=[4], n_initial=0
    )
    assert cal.local_recall["4"]["window"][0] == cal.recall["window"][0]  # layer 0 has nothing below it
    assert cal.local_recall["4"]["window"] != cal.recall["window"]


def test_calibrate_command_local_windows(setup, tmp_path, capsys):
    model, tok = setup
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "hay.txt").write_text(TEXT)
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tmp_path / "m"),
                "--lengths",
                "500",
                "--depths",
                "0.5",
                "--topk",
                "64",
                "--scorings",
                "window",
                "--local-windows",
                "32,100000",
                "--haystack",
                str(tmp_path / "hay.txt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "window@w32" in out and "window@w100000" in out and "paper" not in out.split("\n")[1]
    assert "local filter pass: --param filter_attention=local --param n_recent=" in out
    assert main(["calibrate", "--model", str(tmp_path / "m"), "--scorings", "windw"]) == 2
    assert "--scorings" in capsys.readouterr().err


def test_command_defaults_match_gemfilter():
    from tokensieve.commands.calibrate import DEFAULT_N_INITIAL, SCORING_NAMES
    from tokensieve.methods.gemfilter import SCORINGS, GemFilter

    assert DEFAULT_N_INITIAL == GemFilter().n_initial and SCORING_NAMES == SCORINGS


def test_span_recall_is_the_share_of_answer_tokens_each_rule_keeps(setup):
    """At the chosen layer, each span rule's answer recall equals GemFilter's own selection with that rule,
    checked on the answer phrases' tokens; the suggested rule is the one that keeps whole answers most often."""
    from tokensieve.evaluation.needle import find_span
    from tokensieve.methods.gemfilter import GemFilter

    model, tok = setup
    topk, depths = 40, (0.2, 0.6, 0.9)
    cal = calibrate(model, tok, TEXT, [500], list(depths), topk=topk, scorings=("window",), progress=False)
    assert set(cal.span_recall) == {span_label(*r) for r in SPAN_RULES}
    for kernel, pooling, dilation in SPAN_RULES:
        whole, recall = [], []
        for i, depth in enumerate(depths):
            text, question, expected = NEEDLES[i % len(NEEDLES)]
            ids = encode_prompt(tok, build_needle_prompt(tok, TEXT, 500, depth, text, question).messages)
            answer = torch.tensor(sorted({j for e in expected for j in find_span(tok, ids[0].tolist(), e)}))
            kept = GemFilter(
                topk=topk, filter_layer=cal.best_layer, kernel=kernel, pooling=pooling, dilation=dilation
            ).select(model, ids)
            hit = torch.isin(answer, kept)
            whole.append(bool(hit.all()))
            recall.append(hit.float().mean().item())
        got = cal.span_recall[span_label(kernel, pooling, dilation)]
        assert got["answer_whole"] == pytest.approx(sum(whole) / len(whole), abs=1e-4)
        assert got["answer_recall"] == pytest.approx(sum(recall) / len(recall), abs=1e-4)
    best = max(r["answer_whole"] for r in cal.span_recall.values())
    sp = cal.suggested_span
    assert cal.span_recall[span_label(sp["kernel"], sp["pooling"], sp["dilation"])]["answer_whole"] == best
    default = cal.span_recall[span_label(GemFilter.kernel, GemFilter.pooling, GemFilter.dilation)]
    top = max((r["answer_whole"], r["answer_recall"]) for r in cal.span_recall.values())
    if (default["answer_whole"], default["answer_recall"]) == top:  # a tie keeps GemFilter's default rule
        assert (sp["kernel"], sp["pooling"], sp["dilation"]) == (
            GemFilter.kernel,
            GemFilter.pooling,
            GemFilter.dilation,
        )
