"""LongBench on user-supplied data: LongBench's prompt templates, answer budgets and metrics.

Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding", 2023 (arXiv:2308.14508). No data ships with tokensieve: pass a
JSON-lines file in LongBench's format, one object per line with the fields
``input`` (question, may be empty), ``context``, ``answers`` (list of strings),
``dataset`` (e.g. ``hotpotqa``) and, for classification, ``all_classes``.

As in LongBench:

* the prompt is the dataset's template filled with ``context`` and ``input``;
* a prompt longer than the budget (``--lengths``; default: the model's maximum
  length minus the answer budget) is truncated in the **middle**, keeping its first
  and last halves;
* the few-shot datasets (trec, triviaqa, samsum, lsht, lcc, repobench-p) are fed
  without the chat template, the others with it;
* for trec, triviaqa, samsum and lsht only the first line of the answer is scored;
* a sample's score is the best metric value over its reference answers.

Metrics per dataset type, with the packages LongBench's scorer imports: QA F1
(token F1 after SQuAD normalization), ROUGE-L (the ``rouge`` package's F score on
the raw strings; 0 where it cannot score: an empty answer or reference), classification
accuracy (LongBench's rule: credit split over all class names the answer mentions),
retrieval accuracy (share of the numbers in the answer that are the right
paragraph), count accuracy, and code edit similarity (fuzzy ratio of the first
code line of the answer, in whole percent, as ``fuzzywuzzy``'s ``fuzz.ratio`` / 100;
computed with ``rapidfuzz``). ``rouge`` and ``rapidfuzz`` come with
``pip install 'tokensieve[eval]'``. Chinese datasets are scored on characters
(LongBench uses ``jieba`` words), so their numbers are close to, not equal to,
LongBench's. Datasets not in LongBench get a generic QA template and QA F1.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError, require_extra
from tokensieve.evaluation.harness import Sample, Task, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_QA_MULTI = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me "
    "the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULE = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot "
    'be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, '
    'answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
TEMPLATES: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as "
        "concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\n"
        "Now, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        f"You are given a scientific article and a question. {_QASPER_RULE}\n\nArticle: {{context}}\n\n "
        f"Answer the question based on the above article. {_QASPER_RULE}\n\nQuestion: {{input}}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _QA_MULTI,
    "2wikimqa": _QA_MULTI,
    "musique": _QA_MULTI,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\n"
        "Now, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or "
        "more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one "
        "or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, "
        "how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique "
        "paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is "
        "from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that "
        'the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Now, the next line of code is:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
GENERIC_TEMPLATE = "{context}\n\nAnswer the question based on the text above.\n\nQuestion: {input}\nAnswer:"
MAX_NEW_TOKENS = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}
METRIC_OF = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}


# ----- metrics ----------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred_tokens: list[str], gt_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gt_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_tokens), same / len(gt_tokens)
    return 2 * p * r / (p + r)


def qa_f1(prediction: str, ground_truth: str, **_: Any) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


_ZH_PUNCT = set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def _zh_chars(s: str) -> list[str]:
    drop = set(string.punctuation) | _ZH_PUNCT
    return [c for c in s.lower() if c not in drop and not c.isspace()]


def qa_f1_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    return _f1(_zh_chars(prediction), _zh_chars(ground_truth))


_rouge_scorer: Any = None


def _rouge() -> Any:
    """The ``rouge`` package's scorer, imported on first use."""
    global _rouge_scorer
    if _rouge_scorer is None:
        require_extra("eval", "LongBench's ROUGE-L")
        from rouge import Rouge

        _rouge_scorer = Rouge()
    return _rouge_scorer


def rouge_l(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F score of the ``rouge`` package (the one LongBench calls), on the strings as given.

    That package splits both texts into sentences at ``.``, words at spaces, keeps case and
    punctuation, and computes the summary-level ROUGE-L over the union of sentence LCSs with
    word sets. Where it raises, as LongBench does the score is 0: an answer or reference that
    is empty (or only dots), or an answer sentence and a reference sentence so long (about
    1000 words together) that the package's recursive LCS read-back exceeds Python's recursion limit.
    """
    scorer = _rouge()
    try:
        return float(scorer.get_scores(prediction, ground_truth, avg=True)["rouge-l"]["f"])
    except (ValueError, ZeroDivisionError, RecursionError):
        return 0.0


def rouge_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L on characters (punctuation dropped), each character a word."""
    return rouge_l(" ".join(_zh_chars(prediction)), " ".join(_zh_chars(ground_truth)))


def classification(prediction: str, ground_truth: str, all_classes: list[str] | None = None, **_: Any) -> float:
    """LongBench's rule: the classes named in the answer share the credit; a class that is only part of the truth does not count."""
    if not all_classes:
        raise ValueError("classification scoring needs the sample's 'all_classes' field")
    matches = [c for c in all_classes if c in prediction]
    matches = [m for m in matches if not (m in ground_truth and m != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of(numbers: list[str], right: str) -> float:
    return sum(n == right for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, ground_truth: str, **_: Any) -> float:
    m = re.findall(r"Paragraph (\d+)", ground_truth)
    if not m:
        raise ValueError(f"retrieval answer {ground_truth!r} names no 'Paragraph N'")
    return _share_of(re.findall(r"\d+", prediction), m[0])


def retrieval_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    m = re.findall(r"段落(\d+)", ground_truth)
    if not m:
        raise ValueError(f"retrieval answer {ground_truth!r} names no '段落N'")
    return _share_of(re.findall(r"\d+", prediction), m[0])


def count(prediction: str, ground_truth: str, **_: Any) -> float:
    return _share_of(re.findall(r"\d+", prediction), str(ground_truth))


def _fuzz_ratio(a: str, b: str) -> float:
    """``fuzzywuzzy``'s ``fuzz.ratio(a, b) / 100``: the Indel similarity ``2 * LCS / (len(a) + len(b))``
    (1 for two empty strings) rounded to whole percent. ``rapidfuzz`` computes it as fuzzywuzzy does with
    python-Levenshtein installed; without it fuzzywuzzy falls back to ``difflib``, whose greedy matching
    and junk heuristic (strings of 200 characters or more) can give less."""
    require_extra("eval", "LongBench's code similarity")
    from rapidfuzz import fuzz

    return round(fuzz.ratio(a, b)) / 100


def code_sim(prediction: str, ground_truth: str, **_: Any) -> float:
    """Fuzzy ratio (:func:`_fuzz_ratio`) of the first code line of the answer (not a comment or fence) with the reference line."""
    line = ""
    for ln in prediction.lstrip("\n").split("\n"):
        if "`" not in ln and "#" not in ln and "//" not in ln:
            line = ln
            break
    return _fuzz_ratio(line, ground_truth)


METRICS = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge_l,
    "rouge_zh": rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


def score_longbench(dataset: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """A sample's score: the best metric value over its reference answers (in [0, 1])."""
    if not answers:
        raise ValueError(f"a {dataset} sample has no reference answers")
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[METRIC_OF.get(dataset, "qa_f1")]
    return max(metric(prediction, str(gt), all_classes=all_classes) for gt in answers)


# ----- data and prompts -------------------------------------------------------------------------
def read_longbench(path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> list[dict[str, Any]]:
    """Samples of a LongBench-format JSON-lines file (fields: input, context, answers, dataset).

    ``InputError`` naming the file (and line) for a missing, binary or undecodable file or a bad line.
    """
    from tokensieve.data import read_document

    p = Path(path)
    rows = []
    for i, line in enumerate(
        read_document(p, encoding, errors).split("\n"), 1
    ):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}:{i}: not a JSON object ({exc})") from None
        if not isinstance(row, dict):
            raise InputError(
                f"{p}:{i}: expected a JSON object with input, context, answers, dataset; got a {type(row).__name__}"
            )
        missing = [k for k in ("context", "answers", "dataset") if k not in row]
        if missing:
            raise InputError(
                f"{p}:{i}: missing field(s) {', '.join(missing)}; expected input, context, answers, dataset"
            )
        if not isinstance(row["answers"], list):
            raise InputError(f"{p}:{i}: 'answers' must be a list of strings, got {type(row['answers']).__name__}")
        row.setdefault("input", "")
        row.setdefault("_id", f"line{i}")
        rows.append(row)
    if not rows:
        raise InputError(f"{p} holds no samples")
    return rows


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the first and last ``budget // 2`` tokens (LongBench's truncation)."""
    if len(ids) <= budget:
        return ids
    half = budget // 2
    return ids[:half] + ids[len(ids) - (budget - half) :]


class LongBenchTask(Task):
    """LongBench samples from a file; one sample per (line, length budget)."""

    name = "longbench"

    def __init__(
        self,
        path: str | Path,
        lengths: list[int] | None = None,
        samples: int | None = None,
        datasets: list[str] | None = None,
        max_new_tokens: int | None = None,
        encoding: str = "utf-8",
        errors: str = "strict",
    ):
        self.path = Path(path)
        rows = read_longbench(self.path, encoding, errors)
        if datasets:
            present = sorted({r["dataset"] for r in rows})
            missing = [d for d in datasets if d not in present]
            if missing:
                raise InputError(
                    f"no samples of dataset(s) {', '.join(missing)} in {self.path}; it holds: {', '.join(present)}"
                )
            rows = [r for r in rows if r["dataset"] in datasets]
        if samples:  # the first N of each dataset
            seen: Counter = Counter()
            kept = []
            for r in rows:
                if seen[r["dataset"]] < samples:
                    kept.append(r)
                    seen[r["dataset"]] += 1
            rows = kept
        self.rows, self.lengths, self.max_new_override = rows, lengths, max_new_tokens

    def config(self) -> dict[str, Any]:
        return {"data": str(self.path.resolve()), "max_new_tokens": self.max_new_override}

    def set_default_lengths(self, model_max: int | None) -> None:
        if not self.lengths:
            if model_max is None:
                raise InputError("the model has no maximum length: pass --lengths for LongBench's truncation budget")
            self.lengths = [model_max - max(MAX_NEW_TOKENS.values())]

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], budget: int) -> list[int]:
        ds = row["dataset"]
        text = TEMPLATES.get(ds, GENERIC_TEMPLATE).format(context=row["context"], input=row["input"])
        chat = False if ds in NO_CHAT_TEMPLATE else None
        ids = render(tokenizer, text, chat=chat)
        if len(ids) <= budget:
            return ids
        # LongBench truncates the filled-in prompt (before the chat template) in the middle.
        raw = tokenizer(text, add_special_tokens=False)["input_ids"]
        overhead = len(ids) - len(raw)
        kept = truncate_middle(raw, budget - overhead)
        if len(kept) < 1:
            raise InputError(f"budget {budget} is smaller than the prompt template ({overhead} tokens)")
        return render(tokenizer, tokenizer.decode(kept, skip_special_tokens=True), chat=chat)

    def samples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
        if not self.lengths:
            raise InputError("LongBench needs a truncation budget (--lengths)")
        for n in self.lengths:
            for r in self.rows:
                ds = r["dataset"]
                ids = self.prompt_ids(tokenizer, r, n)
                meta = {
                    "dataset": ds,
                    "id": r["_id"],
                    "metric": METRIC_OF.get(ds, "qa_f1"),
                    "max_new_tokens": self.max_new_override or MAX_NEW_TOKENS.get(ds, 64),
                }
                if r.get("all_classes"):
                    meta["all_classes"] = r["all_classes"]
                yield Sample(f"{ds}/{n}/{r['_id']}", n, ids, [str(a) for a in r["answers"]], meta)

    def score(self, sample: Sample, answer: str) -> float:
        return score_longbench(sample.meta["dataset"], answer, sample.expected, sample.meta.get("all_classes"))
