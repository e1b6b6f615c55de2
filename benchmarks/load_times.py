"""First (dequantize + store) and cached load time of the embedded models.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/load_times.py > benchmarks/results/load_times.json

Uses a fresh temporary TOKENSIEVE_CACHE so the first load really dequantizes the GGUF.
"""

import json
import os
import platform
import tempfile
import time

with tempfile.TemporaryDirectory() as cache:
    os.environ["TOKENSIEVE_CACHE"] = cache
    import tokensieve

    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "models": {}}
    for name in ("smollm2", "gemma3-270m"):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            tokensieve.load_model(name, device="cpu")
            times.append(round(time.perf_counter() - t, 2))
        out["models"][name] = {"first_load_s": times[0], "cached_load_s": times[1]}
    print(json.dumps(out, indent=1))
