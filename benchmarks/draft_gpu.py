"""GemFilter's selection by a draft model on the GPU: a Llama-3.2-1B-shape draft for the Llama-3.1-8B and -70B shapes.

Random weights in the real shapes (time and memory do not depend on weight values; ``tokensieve.bench``'s
shapes and builder). Per target and prompt length, TTFT (median of ``--repeats`` after one cold run) and peak
memory of:

* ``full``: full attention on the whole prompt;
* ``self``: GemFilter's own filter pass (layer 13 of 8B, 36 of 70B: 37 layers), then the second pass;
* ``draft_last`` / ``draft_early``: the draft's filter pass at its last layer (15: all its 16 layers) or an early
  one (7), then the target's second pass on the kept tokens.

Prompts of 32k and 128k run the paper's dense filter pass; 1M runs the local (linear-time) filter pass, chunked
(``filter_attention="local"``, ``chunk_size``), for the self-filter and the draft alike, since a dense pass over
1M tokens takes minutes (376 s for the 8B self-filter, benchmarks/results/gpu/bench_long_1m.json).

The 70B target (131 GiB of bfloat16 weights) runs only where it fits one GPU with the draft (an H200); its
self-filter is timed on a filter-only build (layers 0..36,
``tokensieve.integrations.filter_model.build_filter_model``) after the full model is freed (over chunks of the
prompt where one layer's activations over all of it do not fit): the selection alone (``select_s``), and
``ttft_s`` = that + the second pass measured in the draft cell (the same kept tokens). Cells that cannot fit are
recorded as ``skipped`` with the reason (estimated from the shapes, before anything is allocated); a cell that
runs out of memory anyway is ``oom``.

Resumable: the JSON is rewritten after every cell, and a rerun skips the cells already in it (``--restart``
forgets them). ``--budget-s`` stops starting new cells past that many seconds (the rest are left for a rerun).

    python benchmarks/draft_gpu.py --out "$OUT"            # one H100/H200, about 6 minutes; $OUT/draft_gpu.json
    python benchmarks/draft_gpu.py --smoke --out /tmp/d    # tiny shapes on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

GIB = 1 << 30


def bad_input(message: str) -> NoReturn:
    """One line on stderr and exit code 2, as the CLI answers bad input."""
    print(f"draft_gpu.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


TARGETS = {"8b": "llama3.1-8b", "70b": "llama3.1-70b"}
DRAFT_SHAPE = "llama3.2-1b"
SELF_LAYER = {"llama3.1-8b": 13, "llama3.1-70b": 36, "tiny": 2}  # the 8B's is the paper's; 70B: int(0.45 * 80)
DRAFT_LAYERS = {"draft_last": 15, "draft_early": 7}  # of the draft's 16 layers
SMOKE_DRAFT_LAYERS = {"draft_last": 3, "draft_early": 1}
LOCAL_FROM = 262144  # prompts this long or longer: the local, chunked filter pass
CHUNK = 32768
FULL_MAX_TOKENS = 131072  # full attention past this: minutes of quadratic prefill (and its KV rarely fits)


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        t = part.strip().lower()
        mult = {"k": 1024, "m": 1 << 20}.get(t[-1:], 1)
        try:
            out.append(int(float(t[:-1] if mult > 1 else t) * mult))
        except ValueError:
            bad_input(f"--lengths must be sizes such as 32k,128k,1m; got {text!r}")
    if not out or any(not 64 <= n <= 1 << 22 for n in out):
        bad_input(f"--lengths must be sizes from 64 to 4m, got {text!r}")
    return out


def kv_bytes(cfg: Any, n: int, layers: int | None = None) -> int:
    """Keys and values of ``n`` tokens over ``layers`` (default all) in bfloat16."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * (layers or cfg.num_hidden_layers) * cfg.num_key_value_heads * hd * n * 2


def act_bytes(cfg: Any, n: int) -> int:
    """Rough peak activations of one layer over ``n`` tokens in bfloat16 (MLP gate/up/act + a few hidden states)."""
    return n * (3 * cfg.intermediate_size + 6 * cfg.hidden_size) * 2


def filter_settings(n: int) -> dict[str, Any]:
    return {"filter_attention": "local", "chunk_size": CHUNK} if n >= LOCAL_FROM else {}


def pass_bytes(cfg: Any, n: int, fset: dict[str, Any]) -> int:
    """Rough peak of a filter pass over ``n`` tokens beyond the weights: the local chunked pass holds one
    chunk's activations and layer r's keys; the chunked dense pass also the hidden states [n, D] (float32 to be
    safe) and one layer's KV; the one-shot dense pass one layer's activations over all ``n`` tokens."""
    if fset.get("filter_attention") == "local":
        return act_bytes(cfg, fset["chunk_size"]) + kv_bytes(cfg, n, 1)
    if fset.get("chunk_size"):
        return act_bytes(cfg, fset["chunk_size"]) + kv_bytes(cfg, n, 1) + n * cfg.hidden_size * 4
    return act_bytes(cfg, n) + kv_bytes(cfg, n, 1)


class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        from tokensieve.bench.timing import environment

        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.path = Path(args.out) / "draft_gpu.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.path.read_text()) if self.path.exists() and not args.restart else {}
        self.data: dict[str, Any] = {
            "script": "benchmarks/draft_gpu.py",
            "commands": [*old.get("commands", []), " ".join(sys.argv)],  # every run that added cells
            "topk": args.topk,
            "repeats": args.repeats,
            "environment": environment(self.device),
            "cells": old.get("cells", {}),
            "targets": old.get("targets", {}),
        }
        self.total = (
            torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 1 << 62
        )
        self.t0 = time.perf_counter()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def done(self, key: str) -> bool:
        return key in self.data["cells"] and self.data["cells"][key].get("status") != "budget"

    def record(self, key: str, row: dict[str, Any]) -> None:
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.data["cells"][key] = row
        self.save()
        shown = {
            k: row.get(k)
            for k in ("status", "ttft_s", "select_s", "filter_s", "peak_gib", "reason")
            if row.get(k) is not None
        }
        print(f"[{row['elapsed_s']:7.1f} s] {key}: {shown}", flush=True)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget_s

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, need: int) -> bool:
        return need <= self.total - GIB  # a GiB for the CUDA context and the allocator's slack

    # ---- cells

    def bench(self, key: str, model: Any, method: Any, n: int, need: int, why: str) -> dict[str, Any] | None:
        """One TTFT cell through ``tokensieve.bench.bench_method`` (a cold run, then ``--repeats``)."""
        from dataclasses import asdict

        from tokensieve.bench.timing import bench_method

        if self.done(key):
            return self.data["cells"][key]
        if self.over_budget():
            self.record(key, {"status": "budget", "reason": f"past --budget-s {self.args.budget_s}: rerun to continue"})
            return None
        if not self.fits(need):
            self.record(
                key,
                {"status": "skipped", "reason": f"{why}: needs about {need / GIB:.1f} GiB of {self.total / GIB:.1f}"},
            )
            return None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        repeats = 1 if n >= LOCAL_FROM else self.args.repeats
        row = asdict(bench_method(model, method, n, repeats=repeats, decode_tokens=0, cold_run=n < LOCAL_FROM))
        row["peak_gib"] = round(row["peak_memory_bytes"] / GIB, 2) if row.get("peak_memory_bytes") else None
        row["filter_s"] = row["details"].get("filter_s")
        row["estimated_gib"] = round(need / GIB, 1)
        self.record(key, row)
        self.free()
        return row

    def select_only(
        self, key: str, model: Any, method: Any, n: int, need: int, why: str, second_s: float | None
    ) -> None:
        """The selection alone (``GemFilter.select``) on a filter-only model: median of ``--repeats`` after a cold run."""
        if self.done(key):
            return
        if self.over_budget():
            self.record(key, {"status": "budget", "reason": f"past --budget-s {self.args.budget_s}: rerun to continue"})
            return
        if not self.fits(need):
            self.record(
                key,
                {"status": "skipped", "reason": f"{why}: needs about {need / GIB:.1f} GiB of {self.total / GIB:.1f}"},
            )
            return
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row: dict[str, Any] = {"status": "ok", "length": n, "params": method.params()}
        try:
            times: list[float] = []
            # a cold run (not at 1M), then --repeats timed ones; one timed run only when a run takes over 10 s
            total = 1 if n >= LOCAL_FROM else self.args.repeats + 1
            while len(times) < total:
                t0 = time.perf_counter()
                method.select(model, ids)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if times[-1] > 10 and total > 2:
                    total = 2
            runs = times[1:] if len(times) > 1 else times
            row["cold_s"] = times[0] if len(times) > 1 else None
            row["select_runs"] = runs
            row["select_s"] = sorted(runs)[len(runs) // 2]
            if second_s is not None:
                row["second_pass_s"] = second_s
                row["ttft_s"] = row["select_s"] + second_s
            if self.device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 2)
        except torch.OutOfMemoryError:
            row = {"status": "oom", "length": n}
        self.record(key, row)
        self.free()


def second_pass_s(row: dict[str, Any] | None) -> float | None:
    """TTFT minus the selection of a draft cell: the target's prefill on the kept tokens and its first token."""
    if not row or row.get("status") != "ok" or row.get("filter_s") is None:
        return None
    return row["ttft_s"] - row["filter_s"]


def run(args: argparse.Namespace) -> None:
    from tokensieve.bench.roofline import weights_bytes
    from tokensieve.bench.timing import build_model, shape_config
    from tokensieve.core.draft import DraftModel
    from tokensieve.integrations.filter_model import build_filter_model
    from tokensieve.methods import GemFilter, make_method

    sw = Sweep(args)
    draft_shape = "tiny" if args.smoke else DRAFT_SHAPE
    draft_layers = SMOKE_DRAFT_LAYERS if args.smoke else DRAFT_LAYERS
    dcfg = shape_config(draft_shape)
    draft = build_model(draft_shape, sw.dtype, sw.device, seed=1)
    dw = weights_bytes(draft)
    d = DraftModel(draft, None, draft_shape)
    sw.data["draft"] = {"shape": draft_shape, "weights_gib": round(dw / GIB, 2), "layers": draft_layers}
    for n in args.lengths:  # the draft's selection alone: what replaces a target's filter pass, whatever the target
        for v, layer in draft_layers.items():
            fset = filter_settings(n)
            need = dw + pass_bytes(dcfg, n, fset)
            sw.select_only(
                f"draft/{n}/{v}",
                draft,
                GemFilter(topk=args.topk, filter_layer=layer, **fset),
                n,
                need,
                "the draft's filter pass",
                None,
            )
    for tname in args.targets:
        shape = "tiny" if args.smoke else TARGETS[tname]
        cfg = shape_config(shape)
        r = SELF_LAYER[shape]
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            tw = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) * (
                2 if sw.dtype == torch.bfloat16 else 4
            )
        sw.data.setdefault("targets", {})[tname] = {
            "shape": shape,
            "weights_gib": round(tw / GIB, 2),
            "self_filter_layer": r,
        }
        keys = [f"{tname}/{n}/{v}" for n in args.lengths for v in ("full", "self", *draft_layers)]
        whole_needed = not all(sw.done(k) for k in keys)
        if args.slow_self:  # the long self-filter cells skipped by an earlier run without it: run them now
            for n in args.lengths:
                if sw.data["cells"].get(f"{tname}/{n}/self", {}).get("status") == "skipped":
                    del sw.data["cells"][f"{tname}/{n}/self"]
        whole_fits = sw.fits(tw + dw + GIB) and not (args.smoke and tname == "70b")  # smoke: the filter-only path too
        model = None
        if whole_needed and whole_fits and not sw.over_budget():
            try:
                model = build_model(shape, sw.dtype, sw.device, seed=0)
            except torch.OutOfMemoryError:  # the estimate was too kind: the draft cells say so, the sweep goes on
                sw.free()
                sw.data["targets"][tname]["build"] = "out of memory building the whole model"
        for n in args.lengths:
            fset = filter_settings(n)
            kept = min(args.topk, n)
            base = tw + dw + kv_bytes(cfg, kept) + act_bytes(cfg, kept)
            # next to a target that fills the GPU (70B), the draft's pass runs over smaller chunks (the dense one
            # layer by layer over chunks)
            dset = {**fset, "chunk_size": CHUNK // 4} if tw > sw.total / 2 else fset
            draft_need = base + pass_bytes(dcfg, n, dset)
            for v, layer in draft_layers.items():
                key = f"{tname}/{n}/{v}"
                if model is None:
                    if not sw.done(key):
                        sw.record(
                            key,
                            {
                                "status": "skipped",
                                "reason": f"the {shape} target ({tw / GIB:.0f} GiB) and the draft do not fit one GPU of {sw.total / GIB:.0f} GiB",
                            },
                        )
                    continue
                sw.bench(
                    key,
                    model,
                    GemFilter(topk=args.topk, filter_layer=layer, filter_model=d, **dset),
                    n,
                    draft_need,
                    "the target's weights, the draft and its filter pass",
                )
            key = f"{tname}/{n}/full"
            if n > FULL_MAX_TOKENS and not sw.done(key):
                sw.record(
                    key,
                    {
                        "status": "skipped",
                        "reason": f"full attention over {n} tokens: a quadratic prefill of many minutes and {kv_bytes(cfg, n) / GIB:.1f} GiB of KV",
                    },
                )
            elif model is not None:
                sw.bench(
                    key,
                    model,
                    make_method("full"),
                    n,
                    tw + dw + kv_bytes(cfg, n) + act_bytes(cfg, n),
                    "the weights and the whole prompt's KV",
                )
            elif not sw.done(key):
                sw.record(
                    key,
                    {
                        "status": "skipped",
                        "reason": f"the {shape} target ({tw / GIB:.0f} GiB) does not fit one GPU of {sw.total / GIB:.0f} GiB",
                    },
                )
            if model is not None:
                self_need = tw + dw + pass_bytes(cfg, n, fset)
                key = f"{tname}/{n}/self"
                if sw.fits(self_need) or sw.done(key):
                    sw.bench(
                        key,
                        model,
                        GemFilter(topk=args.topk, filter_layer=r, **fset),
                        n,
                        self_need,
                        "the self-filter pass",
                    )
        del model
        sw.free()
        # a self-filter that the whole model could not run: its selection on a filter-only build (layers 0..r)
        todo = [n for n in args.lengths if not sw.done(f"{tname}/{n}/self")]
        if todo and not sw.over_budget():
            fw = tw * (r + 1) / cfg.num_hidden_layers
            fm = None
            if sw.fits(fw + dw + 4 * GIB):
                try:
                    fm = build_filter_model(
                        cfg, r, device_map=str(sw.device) if sw.device.type == "cuda" else None, dtype=sw.dtype
                    )
                except torch.OutOfMemoryError:
                    sw.free()
            for n in todo:
                fset = filter_settings(n)
                if n >= LOCAL_FROM and tname == "70b" and not args.slow_self:
                    sw.record(
                        f"{tname}/{n}/self",
                        {
                            "status": "skipped",
                            "reason": f"the 70B self-filter's local pass over {n} tokens takes minutes: --slow-self runs it",
                        },
                    )
                    continue
                need = fw + dw + pass_bytes(cfg, n, fset)
                if not sw.fits(need):  # one layer's activations over the whole prompt do not fit: over chunks
                    fset = {**fset, "chunk_size": CHUNK // 4}
                    need = fw + dw + pass_bytes(cfg, n, fset)
                if fm is None:
                    sw.record(
                        f"{tname}/{n}/self",
                        {"status": "skipped", "reason": f"the filter-only build ({fw / GIB:.0f} GiB) does not fit"},
                    )
                    continue
                sw.select_only(
                    f"{tname}/{n}/self",
                    fm,
                    GemFilter(topk=args.topk, filter_layer=r, **fset),
                    n,
                    need,
                    "the filter-only model and its filter pass",
                    second_pass_s(sw.data["cells"].get(f"{tname}/{n}/draft_last")),
                )
            del fm
            sw.free()
    summarize(sw)


def summarize(sw: Sweep) -> None:
    """Speed-ups per target, length and draft layer (``draft_last``, ``draft_early``): full / draft and self / draft
    (TTFT), and the selection's cost against the self-filter's."""
    cells = sw.data["cells"]
    out = {}
    for key, row in cells.items():
        tname, n, v = key.split("/")
        if tname == "draft" or v not in DRAFT_LAYERS or row.get("status") != "ok":
            continue
        full, own = cells.get(f"{tname}/{n}/full", {}), cells.get(f"{tname}/{n}/self", {})
        s = {"draft_ttft_s": row["ttft_s"], "draft_select_s": row.get("filter_s")}
        if full.get("status") == "ok":
            s["speedup_vs_full"] = round(full["ttft_s"] / row["ttft_s"], 2)
        if own.get("status") == "ok" and own.get("ttft_s"):
            s["speedup_vs_self"] = round(own["ttft_s"] / row["ttft_s"], 2)
            own_select = own.get("select_s", own.get("filter_s"))
            if own_select and row.get("filter_s"):
                s["select_fraction_of_self"] = round(row["filter_s"] / own_select, 4)
        out[f"{tname}/{n}/{v}"] = s
    # a target whose own cells could not run: the draft's selection (alone) against the target's self-filter
    for key, row in cells.items():
        tname, n, v = key.split("/")
        if v != "self" or tname == "draft" or not row.get("select_s"):
            continue
        for dv in DRAFT_LAYERS:
            alone = cells.get(f"draft/{n}/{dv}", {})
            if f"{tname}/{n}/{dv}" not in out and alone.get("select_s"):
                out[f"{tname}/{n}/{dv}"] = {
                    "self_select_s": row["select_s"],
                    "draft_select_s": alone["select_s"],
                    "select_fraction_of_self": round(alone["select_s"] / row["select_s"], 4),
                }
    sw.data["summary"] = out
    sw.save()
    print(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        default=os.environ.get("OUT", str(ROOT / "benchmarks/results/draft")),
        help="folder of draft_gpu.json (default $OUT)",
    )
    p.add_argument("--targets", default="8b,70b", help="comma-separated: 8b, 70b (default both)")
    p.add_argument("--lengths", default="32k,128k,1m", help="prompt lengths (default 32k,128k,1m)")
    p.add_argument("--topk", type=int, default=1024, help="kept tokens (default 1024)")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed runs per cell after a cold one (default 2; 1M: one run)"
    )
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="start no new cell after this many seconds (default 420)"
    )
    p.add_argument("--restart", action="store_true", help="forget the cells already in the JSON")
    p.add_argument(
        "--slow-self",
        action="store_true",
        help="also run the 70B self-filter's local pass at 1M and longer (minutes; skipped by default)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, short prompts: checks the script")
    args = p.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or any(t not in TARGETS for t in args.targets):
        bad_input(f"--targets must be a subset of {list(TARGETS)}, got {args.targets}")
    if not 1 <= args.topk <= 1 << 20 or not 1 <= args.repeats <= 10 or not args.budget_s > 0:
        bad_input("--topk in [1, 1M], --repeats in [1, 10], --budget-s > 0")
    args.lengths = parse_sizes(args.lengths)
    if args.smoke:
        global LOCAL_FROM, CHUNK, FULL_MAX_TOKENS
        LOCAL_FROM, CHUNK, FULL_MAX_TOKENS = 2048, 512, 1024
    run(args)


if __name__ == "__main__":
    main()
