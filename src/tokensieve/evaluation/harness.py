"""The evaluation harness: tasks x methods x samples -> one JSON line per cell, resumable.

A *task* (needle, RULER-style, LongBench, perplexity) yields :class:`Sample` s,
each with a stable key (e.g. ``"niah_single/4096/3"``), and knows how to run one
sample with one method (:meth:`Task.evaluate`). :func:`run_eval` runs every
(sample, method) *cell*, appends one JSON line per finished cell to the task's
results file (flushed per line), and skips cells already in the file, so an
interrupted run resumes by running the same command again.

Reliability rules (documented in ``docs/evaluation.md``):

* a cell is identified by (task, task configuration, sample key, model, method,
  method parameters);
  cells already in the file are skipped, lines that do not parse (a line cut off
  by a crash) are ignored, and lines that record an ``error`` are retried;
* a results file written with a different model or task configuration (seed,
  haystack, needle, template, ...) is refused unless ``append=True``; with
  ``restart=True`` the old file is renamed to ``<name>.<timestamp>.jsonl``, never
  deleted: results are never silently overwritten;
* every line records the model, method parameters, task configuration (seed
  included), package versions and the time it was written;
* only declared user errors (:class:`~tokensieve.errors.InputError`, which
  includes a prompt longer than the model allows, and running out of memory)
  are recorded as failed cells; any other exception stops the run;
* one process at a time writes a results folder (``OUT/.lock``).

torch, transformers and the methods are imported where they are used, so the
command line can import this module while it parses its arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError, PromptTooLongError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tokensieve.engine.runner import GenerationResult
    from tokensieve.methods import Method

SCHEMA = 1
LOCK_NAME = ".lock"
# <task>.<YYYYmmdd-HHMMSS>[-N].jsonl: a results file that --restart set aside
_BACKUP_RE = re.compile(r".+\.\d{8}-\d{6}(-\d+)?\.jsonl")


@dataclass
class Sample:
    """One prompt of a task. ``key`` must be stable across runs (it is how resume finds done cells)."""

    key: str
    length: int  # the requested prompt length (a grid coordinate), not necessarily the exact token count
    input_ids: list[int]  # the full prompt, chat template included
    expected: list[str] = field(default_factory=list)  # what the scorer looks for (for the record)
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific coordinates (depth, subtask, dataset, ...)


def render(
    tokenizer: PreTrainedTokenizerBase, user: str, answer_prefix: str = "", chat: bool | None = None
) -> list[int]:
    """Token ids of one user message (chat template when the tokenizer has one), then ``answer_prefix``.

    The answer prefix goes after the assistant turn's start, as RULER does, so the
    model continues it instead of starting from scratch.
    """
    from tokensieve.engine.runner import encode_prompt

    ids = encode_prompt(tokenizer, [{"role": "user", "content": user}], use_chat_template=chat)[0].tolist()
    if answer_prefix:
        ids += tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return ids


def sample_seed(*parts: Any) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return int(h[:12], 16)


class Task:
    """Base class of evaluation tasks.

    Subclasses set ``name``, implement :meth:`config` (everything that changes the
    prompts or the scoring, seed included: it is recorded and compared on resume),
    :meth:`samples` and either :meth:`score` (generation tasks) or :meth:`evaluate`.
    """

    name: str = "task"
    max_new_tokens: int = 32

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def samples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, answer: str) -> float:
        raise NotImplementedError

    def max_tokens(self, sample: Sample) -> int:
        return int(sample.meta.get("max_new_tokens", self.max_new_tokens))

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sample: Sample,
        method: Method,
        allow_long: bool,
    ) -> dict[str, Any]:
        """Run one cell; return the fields of its result line (``score`` included)."""
        res, revivals = run_generation(model, tokenizer, sample.input_ids, method, self.max_tokens(sample), allow_long)
        return self.result_fields(sample, res) | revivals

    def result_fields(self, sample: Sample, res: GenerationResult) -> dict[str, Any]:
        out = generation_fields(res) | {"score": self.score(sample, res.text)}
        span = sample.meta.get("answer_span")
        if span:  # where a selecting method fails: was the answer kept (None: the method keeps every token)
            kept = None if res.kept_indices is None else set(res.kept_indices)
            out["answer_recall"] = None if kept is None else sum(i in kept for i in span) / len(span)
        return out

    def plots(self, rows: list[dict[str, Any]], out: Path) -> list[Path]:
        """Task-specific plots from its result lines (default: none)."""
        return []


def generation_fields(res: GenerationResult) -> dict[str, Any]:
    kv = res.kv_tokens_prefill
    return {
        "answer": res.text,
        "prompt_tokens": res.prompt_tokens,
        "kept_tokens": res.kept_tokens,
        "kv_kept": res.kv_kept,
        "kv_tokens_prefill": sum(kv) / len(kv) if kv else None,  # mean over layers
        "kv_bytes_prefill": res.kv_bytes_prefill,
        "kv_bytes_final": res.kv_bytes_final,
        "ttft_s": res.ttft_s,
        "decode_tokens_per_s": res.decode_tokens_per_s,
        "peak_memory_bytes": res.peak_memory_bytes,
        "generated_tokens": res.generated_tokens,
        "details": {k: v for k, v in res.details.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }


def run_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int] | Any,
    method: Method,
    max_new_tokens: int,
    allow_long: bool,
) -> tuple[GenerationResult, dict[str, Any]]:
    """``runner.generate`` for one prompt (token ids) as every generation task runs it: the result, and the
    fields every result line adds for the method (LazyLLM: :func:`revival_fields`; others: none)."""
    import torch

    from tokensieve.engine.runner import generate

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    probe = RevivalProbe(model, method) if method.name == "lazyllm" else None
    if probe is None:
        res = generate(model, tokenizer, ids, method=method, max_new_tokens=max_new_tokens, allow_long=allow_long)
        return res, {}
    res = generate(
        model,
        tokenizer,
        ids,
        method=probe.method,
        max_new_tokens=max_new_tokens,
        allow_long=allow_long,
        on_token=probe.on_token,
        decoders=probe.pool,
    )
    return res, revival_fields(probe.per_step(res), res.details)


class RevivalProbe:
    """LazyLLM's revivals per decoding step, read from the counters its decode paths already keep.

    LazyLLM counts the (token, layer) KV entries it computes from its aux cache for tokens pruned
    earlier (``revived_kv_computations``): ``LazyDecoder.revived_computations`` on the static path,
    ``LazyState.revived_computations`` on the eager one. The probe reads that host-side integer each
    time a token is chosen (``generate``'s ``on_token``: nothing is read from the device, nothing in
    LazyLLM changes), so the difference between two reads is one decoding step's revivals. The
    prefill revives nothing (every token is new there), so the count starts at 0.

    ``pool`` is a fresh ``DecoderPool`` (what ``generate`` makes when given none), so its LazyLLM
    decoder is this run's; ``method`` is the same LazyLLM (same parameters, same name) whose prefill
    keeps a reference to its state, for the eager path.
    """

    def __init__(self, model: PreTrainedModel, method: Method) -> None:
        from tokensieve.decode.static import DecoderPool

        self.pool = DecoderPool(model)
        self.method = _observed_lazyllm(method)
        self.reads: list[int | None] = []  # the count after decoding steps 1, 2, ...
        self._calls = 0

    def on_token(self, token_id: int) -> None:
        self._calls += 1
        if self._calls > 1:  # the first token comes from the prefill; each later one follows a step
            self.reads.append(self._count())

    def _count(self) -> int | None:
        from tokensieve.methods.lazyllm import LazyDecoder

        for d in self.pool.decoders.values():
            if isinstance(d, LazyDecoder):
                return d.revived_computations
        state = getattr(self.method, "observed_state", None)
        return getattr(state, "revived_computations", None)

    def per_step(self, res: GenerationResult) -> list[int] | None:
        """Revived (token, layer) entries of each decoding step (None where the counter was not readable).

        ``on_token`` is not called for an end-of-sequence token, so the step that chose it is read from
        the run's final count (``details["revived_kv_computations"]``)."""
        steps = len(res.step_times_s)
        reads = list(self.reads[:steps])
        total = res.details.get("revived_kv_computations")
        if any(r is None for r in reads) or total is None or len(reads) < steps - 1:
            return None
        if len(reads) == steps - 1:
            reads.append(int(total))
        cumulative = [0] + reads
        return [b - a for a, b in zip(cumulative, cumulative[1:])]


def _observed_lazyllm(method: Method) -> Method:
    """``method`` (a LazyLLM) as an instance whose ``prefill`` keeps its state in ``observed_state``."""
    import dataclasses

    from tokensieve.methods.lazyllm import LazyLLM

    if not isinstance(method, LazyLLM):
        return method
    return _observing_class()(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})


_OBSERVING: list[type] = []


def _observing_class() -> type:
    if not _OBSERVING:
        from tokensieve.methods.lazyllm import LazyLLM

        class ObservedLazyLLM(LazyLLM):  # same dataclass fields, name and parameters: only prefill is wrapped
            observed_state = None

            def prefill(self, model, input_ids):  # type: ignore[override]
                self.observed_state = super().prefill(model, input_ids)
                return self.observed_state

        _OBSERVING.append(ObservedLazyLLM)
    return _OBSERVING[0]


REVIVAL_FIELDS = (
    "revived_per_step_mean",
    "revived_per_step_max",
    "revived_total",
    "revived_tokens",
    "revival_steps",
    "decode_steps",
)


def revival_fields(per_step: list[int] | None, details: dict[str, Any]) -> dict[str, Any]:
    """LazyLLM's revival counts for a result line (units: (token, layer) KV entries computed from the aux cache).

    ``revived_per_step_mean``/``_max``: over the decoding steps (None without a step); ``revived_total``:
    the whole generation; ``revived_tokens``: distinct tokens revived at least once; ``revival_steps``:
    decoding steps that revived something; ``decode_steps``: decoding steps run.
    """
    total = details.get("revived_kv_computations")
    steps = None if per_step is None else len(per_step)
    return {
        "revived_per_step_mean": total / steps if steps and total is not None else None,
        "revived_per_step_max": max(per_step) if per_step else None,
        "revived_total": total,
        "revived_tokens": details.get("revived_tokens"),
        "revival_steps": None if per_step is None else sum(x > 0 for x in per_step),
        "decode_steps": steps,
    }


def merge_revival_fields(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`revival_fields` of several generations (e.g. the turns of a conversation) as one: totals and
    steps summed, the mean over all their steps, the largest step."""
    if not parts:
        return {}

    def total(key: str) -> int | None:
        values = [p.get(key) for p in parts]
        return None if any(v is None for v in values) else sum(values)

    steps, revived = total("decode_steps"), total("revived_total")
    maxes = [p["revived_per_step_max"] for p in parts if p.get("revived_per_step_max") is not None]
    return {
        "revived_per_step_mean": revived / steps if steps and revived is not None else None,
        "revived_per_step_max": max(maxes) if maxes and steps else None,
        "revived_total": revived,
        "revived_tokens": total("revived_tokens"),
        "revival_steps": total("revival_steps"),
        "decode_steps": steps,
    }


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def cell_id(row: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    """What makes a result line unique: task, its configuration, sample key, model, method, parameters.

    A parameter whose value is ``None`` is left out of the identity, so a line written before a method gained an
    option that is off by default (``None``, e.g. GemFilter's ``filter_model``) still counts as done when the run is
    resumed with the newer code. An option added with any other default changes the identity (the older line ran
    without it, so the cell runs again)."""
    params = {k: v for k, v in row.get("params", {}).items() if v is not None}
    return (
        row.get("task", ""),
        params_key(row.get("task_config", {})),
        row.get("key", ""),
        row.get("model", ""),
        row.get("method", ""),
        params_key(params),
    )


def is_backup(path: str | Path) -> bool:
    """True for a results file that ``restart`` set aside (``<task>.<YYYYmmdd-HHMMSS>.jsonl``)."""
    return bool(_BACKUP_RE.fullmatch(Path(path).name))


def backup_path(path: Path) -> Path:
    """A name for setting ``path`` aside that no file has yet: ``<stem>.<time>[-N]<suffix>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while backup.exists():
        backup = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        n += 1
    return backup


def results_files(path: str | Path) -> list[Path]:
    """The live results files of a folder (every ``*.jsonl`` below it except those ``restart`` set aside),
    or ``[path]`` for a file."""
    p = Path(path)
    if p.is_dir():
        return [f for f in sorted(p.rglob("*.jsonl")) if not is_backup(f)]
    return [p] if p.is_file() else []


def read_results(path: str | Path, on_problem: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Result lines of a JSON-lines file; lines that are not result lines (e.g. cut off by a crash) are skipped.

    ``on_problem`` (if given) is told how many lines were skipped. A file that is not UTF-8
    text raises ``InputError`` naming it and the byte offset.
    """
    p = Path(path)
    if not p.exists():
        return []
    if not p.is_file():  # a folder, a FIFO or a device (/dev/zero) would block or read without end
        raise InputError(f"results path {p} is not a regular file; expected a JSON-lines results file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"results file {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start})"
        ) from None
    rows, bad = [], 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "task" in row and "key" in row:
            rows.append(row)
        else:
            bad += 1
    if bad and on_problem:
        on_problem(f"skipped {bad} corrupt line(s) of {p} (not a JSON result line, e.g. cut off by a crash)")
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: the last successful line, else the last line (an error)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        cid = cell_id(r)
        if cid not in best or not r.get("error") or best[cid].get("error"):
            best[cid] = r
    return list(best.values())


def method_labels(rows: list[dict[str, Any]]) -> dict[int, str]:
    """``id(row) -> label``: the method name, plus the parameters that differ between its runs."""
    by_name: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_name[r["method"]][params_key(r.get("params", {}))] = r.get("params", {})
    varying: dict[str, list[str]] = {}
    for name, variants in by_name.items():
        keys = sorted({k for p in variants.values() for k in p})
        varying[name] = [k for k in keys if len({json.dumps(p.get(k), default=str) for p in variants.values()}) > 1]
    labels = {}
    for r in rows:
        ks = varying[r["method"]]
        p = r.get("params", {})
        labels[id(r)] = r["method"] + (f"({', '.join(f'{k}={p.get(k)}' for k in ks)})" if ks else "")
    return labels


class ResultsMismatchError(InputError):
    """The results file holds lines from another model or task configuration."""


class ResultsLockedError(InputError):
    """Another process is writing the results folder."""


_HELD_LOCKS: dict[str, int] = {}  # folder -> how many times this process holds its lock


@contextmanager
def lock_results_dir(out: str | Path) -> Iterator[Path]:
    """Hold ``out/.lock`` (created with ``out``): one process at a time writes a results folder.

    Raises :class:`ResultsLockedError` naming the other process's pid at once (it does not wait).
    Re-entrant within a process; the lock goes with the process if it dies.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; expected a folder for the results")
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        yield out
        return
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield out
        finally:
            _HELD_LOCKS[key] -= 1
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise ResultsLockedError(
            f"{out} is in use by another tokensieve eval (pid {pid}); wait for it to finish or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = 1
    try:
        yield out
    finally:
        del _HELD_LOCKS[key]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    import tokensieve

    return {
        "tokensieve": tokensieve.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def model_info(model: PreTrainedModel) -> dict[str, Any]:
    cfg = model.config.get_text_config()
    return {
        "model_type": getattr(cfg, "model_type", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(model.device),
    }


def prepare_results_file(
    path: Path, model: str, task: Task, restart: bool = False, append: bool = False
) -> list[dict[str, Any]]:
    """Check (or set aside) an existing results file; return its lines that count for this run."""
    rows = read_results(path)
    if path.exists() and restart:
        path.rename(backup_path(path))
        return []
    now = jsonable(task.config())
    cfg = json.dumps(now, sort_keys=True, default=str)
    other = [
        r
        for r in rows
        if r.get("model") != model or json.dumps(r.get("task_config"), sort_keys=True, default=str) != cfg
    ]
    if other and not append:
        r = other[0]
        diff = []
        if r.get("model") != model:
            diff.append(f"model {r.get('model')!r} (now {model!r})")
        old = r.get("task_config") or {}
        for k in sorted(set(old) | set(now)):
            if old.get(k) != now.get(k):
                diff.append(f"{k}={old.get(k)!r} (now {now.get(k)!r})")
        raise ResultsMismatchError(
            f"{path} already holds {len(other)} result line(s) from another run: {'; '.join(diff)}. "
            f"Use another --out folder, --restart to set the old file aside (it is renamed, not deleted), "
            f"or --append to add these results to it"
        )
    return rows


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def check_prompt_lengths(samples: Sequence[Sample], limit: int | None, allow_long: bool) -> list[Sample]:
    """The samples longer than ``limit`` positions (none with ``allow_long``).

    ``PromptTooLongError`` when that is every sample: every cell would fail, so the run
    stops before any model work, in one message.
    """
    if allow_long or limit is None:
        return []
    long = [s for s in samples if len(s.input_ids) > limit]
    if samples and len(long) == len(samples):
        sizes = sorted(len(s.input_ids) for s in long)
        lengths = ", ".join(str(n) for n in sorted({s.length for s in long}))
        raise PromptTooLongError(
            f"every prompt is longer than the model's maximum of {limit} positions (length(s) {lengths}: "
            f"{sizes[0]}{'-' + str(sizes[-1]) if sizes[-1] != sizes[0] else ''} tokens); "
            f"use lengths up to {limit}, or pass allow_long=True (--allow-long) to run them anyway"
        )
    return long


def run_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    methods: Sequence[Method | str],
    out: str | Path,
    model_name: str,
    allow_long: bool = False,
    restart: bool = False,
    append: bool = False,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run every (sample, method) cell of ``task`` not yet in ``out/<task>.jsonl``; return that file's path.

    A cell that raises ``InputError`` (e.g. ``PromptTooLongError``) or runs out of memory is
    recorded as a line with ``error`` (and retried by the next run); any other exception
    propagates. ``out`` is locked for the run (:func:`lock_results_dir`).
    """
    from tqdm import tqdm

    from tokensieve.methods import make_method
    from tokensieve.methods.base import max_positions

    with lock_results_dir(out) as out:
        path = out / f"{task.name}.jsonl"
        unique: dict[tuple[str, str], Method] = {}
        for m in map(make_method, methods):  # the same method twice would run its cells twice
            unique.setdefault((m.name, params_key(jsonable(m.params()))), m)
        methods = list(unique.values())
        samples = list(task.samples(tokenizer))
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise ValueError(f"task {task.name!r} produced duplicate sample keys")
        limit = max_positions(model)
        too_long = {s.key for s in check_prompt_lengths(samples, limit, allow_long)}
        prev = prepare_results_file(path, model_name, task, restart=restart, append=append)
        done = {cell_id(r) for r in prev if not r.get("error")}
        total = len(samples) * len(methods)
        base = {
            "schema": SCHEMA,
            "task": task.name,
            "task_config": jsonable(task.config()),
            "model": model_name,
            "model_info": model_info(model),
            "env": environment(),
        } | (extra or {})
        recorded = (InputError, *_oom_errors())

        def todo(s: Sample, m: Method) -> bool:
            cell = {
                "task": task.name,
                "task_config": base["task_config"],
                "key": s.key,
                "model": model_name,
                "method": m.name,
                "params": jsonable(m.params()),
            }
            return cell_id(cell) not in done

        remaining = sum(todo(s, m) for s in samples for m in methods)
        bar = tqdm(
            total=total,
            initial=total - remaining,
            desc=f"eval {task.name}",
            disable=not progress,
            unit="cell",
            file=sys.stderr,
        )
        with open_for_append(path) as f:
            for s in samples:
                for m in methods:
                    if not todo(s, m):
                        continue
                    bar.set_postfix_str(f"{m.name} {s.key}", refresh=False)
                    row = dict(
                        base,
                        key=s.key,
                        length=s.length,
                        method=m.name,
                        params=jsonable(m.params()),
                        meta=s.meta,
                        expected=s.expected,
                    )
                    try:
                        if s.key in too_long:
                            from tokensieve.engine.runner import ALLOW_LONG_HINT, check_prompt_length

                            check_prompt_length(len(s.input_ids), limit, hint=ALLOW_LONG_HINT)
                        row |= task.evaluate(model, tokenizer, s, m, allow_long)
                    except recorded as exc:  # the user's to fix (a prompt too long, a parameter), or out of memory
                        row |= {"error": f"{type(exc).__name__}: {exc}", "score": None}
                        if progress:
                            bar.write(
                                f"{m.name} {s.key}: {row['error']} (recorded; retried on the next run)", file=sys.stderr
                            )
                    row["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                    f.write(json.dumps(row, default=str) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    if on_row:
                        on_row(row)
                    bar.update()
        bar.close()
    return path


def jsonable(params: dict[str, Any]) -> dict[str, Any]:
    """Method parameters as they will read back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(params, default=str))


class open_for_append:
    """Open a JSON-lines file for appending; if a crash left a half-written last line, start on a new line."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self.f = self.path.open("a", encoding="utf-8")
        if needs_newline:
            self.f.write("\n")
        return self.f

    def __exit__(self, *exc) -> None:
        self.f.close()
