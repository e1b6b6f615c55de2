"""What the low-rank adapter saves: full fine-tune vs LoRA, each a few training steps in its own process.

Each setting runs ``tokensieve.training.train`` in a fresh child process (so one's peak does not hide the
other's) and reports: trainable parameters, gradient bytes (float32, one per trainable parameter), the
optimizer state bytes read back from the checkpoint's ``trainer_state.pt`` (AdamW's two moments), the seconds
per step, and the process's peak resident memory (``resource.getrusage``) after the last step, before anything
is saved. A third child only loads the model, for the resident baseline. Writes ``--out`` (JSON).

CPU, the committed result (a few minutes):

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/lora_memory.py --data $PG19/10146.txt \\
        --model smollm2 --seq-len 512 --steps 3 --rank 16 --work /tmp/lora_mem \\
        --out benchmarks/results/training/lora_memory_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict:
    import torch

    from tokensieve.training import TrainConfig, train

    if args.child == "load":
        from tokensieve.core.models import load_model

        load_model(args.model, dtype="float32", device="cpu")
        return {"setting": "load only", "peak_rss_bytes": _peak_rss_bytes()}
    lora = args.child == "lora"
    out = Path(args.work) / args.child
    cfg = TrainConfig(
        model=args.model,
        out=str(out),
        data=[args.data],
        seq_len=args.seq_len,
        batch_size=1,
        steps=args.steps,
        warmup=1,
        lr=1e-4,
        save_every=10_000_000,
        device="cpu",
        kernel="sdpa",
        max_tokens=args.seq_len * (args.steps + 2),
        lora_rank=args.rank if lora else 0,
        lora_alpha=float(2 * args.rank),
        lora_targets=args.targets,
    )
    peaks, times = [], []
    t0 = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        peaks.append(_peak_rss_bytes())
        times.append(time.perf_counter() - t0[0])
        t0[0] = time.perf_counter()

    res = train(cfg, on_step=on_step)
    state = torch.load(out / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=False)["optimizer"]
    opt_bytes = sum(
        t.numel() * t.element_size() for s in state["state"].values() for t in s.values() if torch.is_tensor(t)
    )
    return {
        "setting": f"LoRA r={args.rank} ({args.targets}, alpha {2 * args.rank})" if lora else "full fine-tune",
        "trainable_parameters": res.trainable_parameters,
        "gradient_bytes": res.trainable_parameters * 4,
        "optimizer_state_bytes": opt_bytes,
        "peak_rss_bytes": peaks[-1],
        "peak_rss_bytes_per_step": peaks,
        "seconds_per_step": times,
        "losses": res.losses,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a training text file (only the first tokens are read)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attn", choices=("attn", "attn+mlp"))
    ap.add_argument("--work", required=True, help="scratch folder for the runs' outputs")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--child", default=None, choices=("load", "full", "lora"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import shutil

    runs = []
    for which in ("load", "full", "lora"):
        shutil.rmtree(Path(args.work) / which, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child", which, "--data", args.data, "--model", args.model]
        cmd += ["--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rank", str(args.rank)]
        cmd += ["--targets", args.targets, "--work", args.work]
        print(f"running {which} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in runs[-1].items() if not isinstance(v, list)}), file=sys.stderr)
    result = {
        "command": "python benchmarks/lora_memory.py "
        + " ".join("$PG19/" + Path(a).name if a == args.data else a for a in sys.argv[1:]),
        "model": args.model,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "machine": f"{platform.machine()} CPU, float32",
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
