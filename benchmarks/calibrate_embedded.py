"""Calibration of the GemFilter filter layer for the two embedded models (the run behind KNOWN_FILTER_LAYERS).

Command: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibrate_embedded.py > log; equivalent CLI:
    tokensieve calibrate --model smollm2 --lengths 2000,4000 --topk 1024 --json
Output committed in benchmarks/results/calibrate_embedded.json (recall of the needle tokens in the
top-1024 selection per layer, mean over 10 prompts; also the load times: first load dequantizes the GGUF).
"""

import json
import time

import tokensieve
from tokensieve.data import read_text
from tokensieve.evaluation.calibrate import calibrate

for name in ["smollm2", "gemma3-270m"]:
    t = time.time()
    model, tok = tokensieve.load_model(name)
    print(name, "load", time.time() - t, flush=True)
    t = time.time()
    model, tok = tokensieve.load_model(name)
    print(name, "load2", time.time() - t, flush=True)
    hay = read_text(min_chars=200000)
    cal = calibrate(model, tok, hay, [2000, 4000], [0.1, 0.3, 0.5, 0.7, 0.9], topk=1024, progress=False)
    print(json.dumps(cal.to_dict()), flush=True)
