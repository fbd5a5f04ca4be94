"""Benchmark scoring speed with each context read once for all its continuations, against one row
per request (the old way), on the same documents:

    python -m benchmarks.bench_eval                        # SmolLM2-135M, 40 documents per task
    python -m benchmarks.bench_eval --limit 100 --tasks arc_easy,hellaswag --out eval.json

Both ways score the same requests with the same model (float32) and the same batching settings
as the evaluation's defaults. Each way runs once to compile (reported apart), then `--repeats`
times; documents per second are medians. The per-document results must agree: the same
predictions, log-likelihoods within float32 rounding (reported as the largest difference).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

from benchmarks.machine import cpu_name
from finercut_jax.evaluation import harness_tasks
from finercut_jax.evaluation.lm import EvalModel, loglikelihood
from finercut_jax.evaluation.run import default_eval_config, scoring_config
from finercut_jax.model import loading


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,hellaswag,winogrande,boolq,"
                                    "openbookqa,lambada")
  p.add_argument("--limit", type=int, default=40)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  path = loading.resolve_path(args.model)
  cfg, params = loading.load_params(path)
  model = EvalModel.from_dense(cfg, params)
  tokenizer = loading.load_tokenizer(path)
  eval_config = default_eval_config()
  eval_config.scoring.max_length = cfg.max_position_embeddings
  base = scoring_config(eval_config.scoring)
  tasks = [t for t in args.tasks.split(",") if t]
  docs = {t: harness_tasks.load_docs(t, args.limit) for t in tasks}
  n_docs = sum(len(d) for d in docs.values())

  results, rows = {}, {}
  for name, share in (("one row per request", False), ("shared contexts", True)):
    scoring = dataclasses.replace(base, share_contexts=share)

    def score_all():
      out = {}
      for t, ds in docs.items():
        lls = loglikelihood(model, tokenizer, [r for d in ds for r in d.requests], scoring)
        out[t] = harness_tasks.score_docs(t, ds, lls)
      return out

    start = time.perf_counter()
    score_all()  # compiles
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      results[name] = score_all()
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    rows[name] = {"seconds": seconds, "docs_per_second": n_docs / seconds,
                  "first_call_seconds": first, "times": times}

  old, new = results["one row per request"], results["shared contexts"]
  same_predictions = all(
      [(p.get("pred"), p.get("pred_norm"), p.get("greedy")) for p in old[t][1]]
      == [(p.get("pred"), p.get("pred_norm"), p.get("greedy")) for p in new[t][1]]
      for t in tasks)
  same_metrics = all(old[t][0] == new[t][0] for t in tasks)
  max_ll_diff = max(float(np.max(np.abs(np.asarray(a["ll"]) - np.asarray(b["ll"]))))
                    for t in tasks for a, b in zip(old[t][1], new[t][1]))
  speedup = rows["one row per request"]["seconds"] / rows["shared contexts"]["seconds"]
  report = {"cpu": cpu_name(), "devices": str(jax.devices()), "model": path,
            "tasks": tasks, "limit": args.limit, "documents": n_docs, "repeats": args.repeats,
            "modes": rows, "speedup": speedup, "same_predictions": same_predictions,
            "same_metrics": same_metrics, "max_loglikelihood_difference": max_ll_diff}
  print(f"{cpu_name()}; {n_docs} documents ({args.limit} per task of {', '.join(tasks)})")
  for name, r in rows.items():
    print(f"  {name:22s} {r['docs_per_second']:8.2f} docs/s  (median of {args.repeats}: "
          f"{r['seconds']:.1f} s; first call {r['first_call_seconds']:.1f} s)")
  print(f"  speed-up {speedup:.2f}x; same predictions: {same_predictions}; same metrics: "
        f"{same_metrics}; largest log-likelihood difference {max_ll_diff:.2g}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
