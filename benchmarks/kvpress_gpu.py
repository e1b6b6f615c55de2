"""NVIDIA kvpress's SnapKV, as its README runs it, on the same GPU and model shape as tokensieve's decode benchmark.

kvpress 0.5.5 needs transformers < 5.3, so this script runs in its own process with kvpress and
transformers 5.2 on ``PYTHONPATH`` (wheels carried to the GPU machine; see the README's command). It builds
the Llama-3.1-8B shape with random weights in bf16 (SDPA attention), then for each prompt length:

* ``with SnapKVPress(compression_ratio=1 - 1024/n)(model): model.generate(ids, max_new_tokens=256)`` —
  the end-to-end latency of a 256-token answer keeping 1,024 prompt entries, and its TTFT
  (``max_new_tokens=1``);
* the same ``model.generate`` without a press.

An out-of-memory cell is recorded as ``oom``. Writes ``--out`` (JSON) after every cell.
``datasets`` and ``fire`` are imported by kvpress's package ``__init__`` for presses not used here; when
they cannot be imported on the GPU machine, empty stand-in modules are registered instead (recorded in
the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import torch


def import_kvpress() -> tuple[object, list[str]]:
    stubbed = []
    for name in ("datasets", "fire"):
        try:
            __import__(name)
        except Exception:  # a missing or incompatible package used only by presses not run here
            mod = types.ModuleType(name)
            mod.load_dataset = None  # type: ignore[attr-defined]
            sys.modules[name] = mod
            stubbed.append(name)
    import kvpress

    return kvpress, stubbed


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    kvpress, stubbed = import_kvpress()
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )  # Llama-3.1-8B's published config values
    cfg = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = {
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "stubbed_modules": stubbed,
        "tokens": args.tokens,
        "budget": args.budget,
        "rows": [],
    }
    print(
        f"kvpress with transformers {transformers.__version__}, torch {torch.__version__} on {out['gpu']}", flush=True
    )

    def gen(ids, n_new, press=None):
        def run():
            with torch.inference_mode():
                if press is None:
                    model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
                else:
                    with press(model):
                        model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)

        return timed(run)

    warm = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    gen(warm, 4)
    gen(warm, 4, kvpress.SnapKVPress(compression_ratio=0.5))
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to("cuda")
        for label in ("kvpress-snapkv", "transformers-generate"):
            press = kvpress.SnapKVPress(compression_ratio=1 - args.budget / n) if label == "kvpress-snapkv" else None
            row = {"label": label, "length": n}
            try:
                row["ttft_s"] = gen(ids, 1, press)
                row["e2e_s"] = gen(ids, args.tokens, press)
                row["decode_per_token_s"] = (row["e2e_s"] - row["ttft_s"]) / (args.tokens - 1)
                row["status"] = "ok"
                print(
                    f"{label:>22} {n:>7}: ttft {row['ttft_s']:.2f} s, e2e {row['e2e_s']:.2f} s, "
                    f"{row['decode_per_token_s'] * 1e3:.1f} ms/token",
                    flush=True,
                )
            except torch.OutOfMemoryError as exc:
                row["status"] = "oom"
                row["error"] = str(exc).splitlines()[0][:200]
                print(f"{label:>22} {n:>7}: out of memory ({row['error']})", flush=True)
            out["rows"].append(row)
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
