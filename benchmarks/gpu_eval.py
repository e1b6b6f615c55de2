"""Accuracy evaluations on the lent GPU: one `tokensieve eval` process per (task, method), in parallel.

SmolLM2-135M leaves an H100 almost idle (each step is a few kernel launches), so the
methods run side by side, one process each, sharing the GPU. Each process writes its own
resumable results file under --work; at the end (or at --deadline, when the processes are
stopped, losing at most the line being written) the files are merged into
``--out/<task>.jsonl``. Running the same command again resumes every process where it
stopped. Scores are unaffected by the sharing; TTFTs in these files are measured with
the GPU shared by all processes, so they are rough.

    PYTHONPATH=src python3 benchmarks/gpu_eval.py --work /tmp/evalwork --out $OUT \\
        --methods full,gemfilter,lazyllm,snapkv,h2o,streamingllm,sepllm \\
        --run "needle --model smollm2 --device cuda --dtype float32 --lengths 1k,2k,4k,8k --param budget=1024" \\
        --run "ruler --model smollm2 --device cuda --dtype float32 --lengths 1k,2k,4k,8k --samples 10 --param budget=1024"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tokensieve.evaluation.harness import read_results


def merge(files: list[Path], target: Path) -> int:
    """Write the result lines of ``files`` (a half-written last line is skipped) into ``target``; returns their number."""
    rows = [row for f in files for row in read_results(f)]
    target.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    return len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder of the per-process results (kept between runs)")
    ap.add_argument("--out", required=True, help="folder for the merged <task>.jsonl files and logs")
    ap.add_argument(
        "--methods",
        required=True,
        help="comma-separated; one process per method and task (a --run may name its own with --methods)",
    )
    ap.add_argument("--run", action="append", required=True, help="'TASK ARGS...' for `tokensieve eval`")
    ap.add_argument("--deadline", type=float, default=None, help="stop the processes after this many seconds")
    ap.add_argument(
        "--merge-every", type=float, default=60.0, help="merge the finished lines into --out every this many seconds"
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="run at most this many processes at a time, in --run order "
        "(0: all at once; ~30 concurrent CUDA-graph captures on one H200 failed)",
    )
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs < 0:
        ap.error(f"--jobs must be >= 0, got {args.jobs}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pending: list[tuple[str, list[str], Path]] = []  # (task/method, command, results file), started in order
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    t0 = time.time()
    for spec in args.run:
        task, *rest = shlex.split(spec)
        methods = args.methods
        if "--methods" in rest:  # a run may name its own methods
            i = rest.index("--methods")
            methods = rest[i + 1]
            del rest[i : i + 2]
        # one folder per (run, method): a method may run in several --run specs with other parameters
        tag = hashlib.sha1(shlex.join(rest).encode()).hexdigest()[:8]
        for method in methods.split(","):
            d = work / task / f"{method}-{tag}"
            d.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "tokensieve.cli",
                "eval",
                task,
                *rest,
                "--methods",
                method,
                "--out",
                str(d),
                "--no-plots",
                "--quiet",
            ]
            pending.append((f"{task}/{method}", cmd, d / f"{task}.jsonl"))
    tasks = sorted({shlex.split(s)[0] for s in args.run})

    def start_more() -> None:
        while pending and (not args.jobs or sum(p.poll() is None for _, p, _ in procs) < args.jobs):
            name, cmd, results = pending.pop(0)
            log = open(out / f"{name.split('/')[0]}.log", "a")
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=log), results))

    def merge_all(say: bool) -> None:
        for task in tasks:
            files = sorted(f for name, _, f in procs if name.startswith(task + "/") and f.exists())
            n = merge(files, out / f"{task}.jsonl")
            if say:
                print(f"{task}: {n} result lines", flush=True)

    stopped, merged = False, time.time()
    start_more()
    while any(p.poll() is None for _, p, _ in procs) or (pending and not stopped):
        if not stopped:
            start_more()
        if args.deadline and time.time() - t0 > args.deadline and not stopped:
            pending.clear()
            for _, p, _ in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            stopped = True
        if time.time() - merged > args.merge_every:  # what is done so far is in --out while the run goes on
            merge_all(False)
            merged = time.time()
        time.sleep(2)
    for name, p, _ in procs:
        print(f"{name}: exit {p.returncode}", flush=True)
    merge_all(True)
    print(f"wall {time.time() - t0:.0f} s{' (stopped at the deadline; run again to resume)' if stopped else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
