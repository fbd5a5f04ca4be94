"""FinerCut beside the block- and sublayer-pruning baselines, on one model, one set of
calibration tokens and one evaluation: every method ranks into its own run directory of one
comparison directory (`rundir.ComparisonDir`), the dense model is evaluated once, and the report
puts them side by side. Rerunning reuses every method whose run directory already holds the
requested ratios, and every evaluation already made with the same settings; an interrupted greedy
search resumes."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from finercut_jax import search
from finercut_jax.evaluation import (EvalModel, comparison_report, evaluate_model, evaluate_run,
                                     heldout_for_run, pending_work, resolve_eval_config,
                                     resolve_max_length, result_settings, scoring_config)
from finercut_jax.jobs.job import Job, masks_at, prepare
from finercut_jax.model import Llama
from finercut_jax.parallel import distributed
from finercut_jax.rundir import ComparisonDir, RunDir, ratio_key
from finercut_jax.search import baselines

DEFAULT_RATIOS = (0.125, 0.25, 0.375)


class ComparisonError(ValueError):
  """The comparison directory or the request does not fit."""


def parse_methods(text: str) -> list[str]:
  """Comma-separated method names (or "all", or "") as a list without repeats; an unknown name is
  an error naming the choices."""
  names = (list(baselines.METHODS) if text.strip() in ("", "all")
           else [t.strip() for t in text.split(",") if t.strip()])
  for name in names:
    baselines.get_method(name)  # an unknown name fails here
  return list(dict.fromkeys(names))


def check_ratios(methods: Sequence[str], ratios: Sequence[float], num_layers: int) -> None:
  """Every method can remove something at every ratio (see `baselines.units_removed`)."""
  if not ratios:
    raise ComparisonError("no ratios given")
  for name in methods:
    for r in ratios:
      baselines.units_removed(baselines.get_method(name), r, num_layers)


def comparison_eval_config(config: ml_collections.ConfigDict, ratios: Sequence[float],
                           limit: int, max_position_embeddings: int) -> ml_collections.ConfigDict:
  """The one evaluation every model of the comparison gets: the config's tasks and perplexity
  settings, `limit` documents per task, no throughput (structure, not speed, is compared)."""
  c = resolve_eval_config(copy.deepcopy(config.eval))
  c.enabled = True
  c.limit = limit
  c.ratios = ",".join(f"{r:g}" for r in ratios)
  c.throughput.enabled = False
  return resolve_max_length(c, max_position_embeddings)


def run_comparison(config: ml_collections.ConfigDict, *, methods: Iterable[str] | None = None,
                   ratios: Iterable[float] = DEFAULT_RATIOS, seeds: Iterable[int] = (0, 1, 2),
                   limit: int = 30, comparison_dir: str | None = None, log=None) -> dict:
  """Runs (or resumes) the comparison; returns what comparison.json holds. `comparison_dir`
  defaults to `<config.run_dir>_comparison`."""
  methods = parse_methods(",".join(methods) if methods else "all")
  ratios = sorted({float(r) for r in ratios})
  seeds = [int(s) for s in seeds]
  if not seeds and any(baselines.METHODS[m].ranking == "random" for m in methods):
    raise ComparisonError("the random methods need at least one seed (--seeds)")
  if limit < 0:
    raise ComparisonError(f"--limit must be >= 0, got {limit}")
  directory = (ComparisonDir(comparison_dir) if comparison_dir
               else ComparisonDir.beside(config.run_dir))
  config = copy.deepcopy(config)
  with config.unlocked():
    config.run_dir = directory.method(methods[0]).path  # validated like any run directory
  job = prepare(config)
  log = log if log is not None and distributed.is_primary() else distributed.primary_print
  check_ratios(methods, ratios, job.model_cfg.num_layers)
  eval_config = comparison_eval_config(config, ratios, limit,
                                       job.model_cfg.max_position_embeddings)
  distributed.on_primary(lambda: _check_directory(directory, job))
  with _locked(directory):  # one job per comparison directory
    distributed.on_primary(lambda: directory.write_start(job.fingerprint, job.tokens))
    return _compare(config, job, methods, ratios, seeds, eval_config, directory, log)


def _locked(directory: ComparisonDir) -> contextlib.ExitStack:
  """The directory's lock, held by process 0 for the block."""
  stack = contextlib.ExitStack()
  distributed.on_primary(lambda: stack.enter_context(directory.lock()) and None)
  return stack


def _check_directory(directory: ComparisonDir, job: Job) -> None:
  """A comparison directory belongs to one model, dtype and set of calibration tokens."""
  tokens = directory.read_tokens()
  if tokens is not None and not np.array_equal(tokens, job.tokens):
    raise ComparisonError(f"{directory} was made with other calibration tokens; use another "
                          f"--comparison_dir or the data settings it was made with")
  stored = directory.read_fingerprint()
  if stored is None:
    return
  differ = [k for k in sorted(set(stored) | set(job.fingerprint))
            if stored.get(k) != job.fingerprint.get(k)]
  if differ:
    names = {"tokens_sha256": "calibration tokens", "weights": "model weights"}
    raise ComparisonError(f"{directory} was made with another "
                          f"{', '.join(names.get(k, k) for k in differ)}; use another "
                          f"--comparison_dir")


def _method_config(config, method: baselines.Method, ratios, run_dir: RunDir, seed=None):
  """The job config as the method ran it (written to its run directory's config.json)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.run_dir = run_dir.path
    c.search.ratio = max(ratios)
    c.search.mask_ratios = tuple(ratios)
    c.search.full_ordering = False
    c.search.one_shot = False
    if method.ranking == "search":
      c.search.metric, c.search.pool = method.metric, method.pool
    c.eval.enabled = False
    c.heal.enabled = False
    c.method = method.name
    c.seed = seed
  return c


def run_method(config, job: Job, name: str, ratios: Sequence[float], params, similarities_fn,
               log, run_dir: RunDir, seed: int | None = None) -> RunDir:
  """Ranks with one method and writes its run directory."""
  method = baselines.get_method(name)
  L = job.model_cfg.num_layers
  removals = lambda r: baselines.units_removed(method, r, L)  # noqa: E731
  n_max = max(removals(r) for r in ratios)
  method_config = json.loads(_method_config(config, method, ratios, run_dir, seed).to_json())
  distributed.on_primary(lambda: run_dir.write_start(method_config, job.tokens))
  extra = {}
  if method.ranking == "search":
    finercut = method.name.startswith("finercut")
    spec = search.SearchSpec(num_layers=L, pool=method.pool, num_steps=n_max,
                             protect_front=config.search.protect_front if finercut else None)
    scorer = job.scorer(config.scorer, params, method.metric, len(spec.pool_candidates()))
    steps = job.search(scorer, spec, run_dir, method.metric, desc=method.name)
    del scorer
    steps_for = lambda n: steps  # noqa: E731
  elif method.ranking == "random":
    steps = baselines.random_steps(L, method.unit, seed)
    steps_for = lambda n: steps  # noqa: E731
    extra = {"seed": seed}
  elif name == "gromov":
    sim = similarities_fn()
    steps = baselines.gromov_steps(sim, n_max)
    steps_for = lambda n: baselines.gromov_steps(sim, n)  # noqa: E731
    runs = {}
    for r in ratios:
      first, distance = baselines.gromov_run(sim, removals(r))
      runs[ratio_key(r)] = {"first_block": first, "num_blocks": removals(r),
                            "angular_distance": distance}
    # The best run of n blocks need not contain the best run of fewer: masks are per ratio.
    extra = {"nested": False, "runs": runs}
  else:
    sim = similarities_fn()
    steps = (baselines.shortgpt_steps(sim) if name == "shortgpt"
             else baselines.llm_drop_steps(sim, joint=name == "llm_drop_joint"))
    steps_for = lambda n: steps  # noqa: E731
  masks = masks_at(ratios, removals, steps_for, L)
  ranking = job.ranking(steps, pool=method.pool or method.unit, metric=method.metric,
                        method=method.name, **extra)
  job.save_results(run_dir, ranking, masks, params)
  log(f"{name}{'' if seed is None else f' (seed {seed})'}: " + "; ".join(
      f"{r}: {int((~k).sum())} sublayers" for r, k in masks.items()))
  return run_dir


def _dense_entry(directory: ComparisonDir, config, job: Job, params, eval_config, log) -> dict:
  """The dense model's evaluation, made once (and reused from dense_eval.json)."""
  stored = distributed.on_primary(directory.read_dense_eval)
  model = EvalModel(Llama.from_params(job.model_cfg, params), "dense")
  pending = pending_work(stored, result_settings(eval_config))
  if stored is not None and not (pending["tasks"] or pending["perplexity"]):
    log(f"dense: reusing {os.path.basename(directory.dense_eval_file)}")
    return stored
  heldout = heldout_for_run(json.loads(config.to_json()), job.tokenizer, eval_config,
                            job.tokens)
  entry = {**evaluate_model(model, job.tokenizer, eval_config, heldout=heldout,
                            scoring=scoring_config(eval_config.scoring), log=log,
                            previous=stored),
           "ratio": 0.0, "source": "source"}
  distributed.on_primary(lambda: directory.write_dense_eval(entry))
  return entry


def _evaluate_method(run_dir: RunDir, dense: dict, eval_config, mesh, log) -> dict:
  """A method's pruned models, with the shared dense result put in place first so that
  `evaluate_run` reuses it rather than evaluating the dense model again."""
  def seed_dense():
    results = run_dir.read_eval_results()
    models = results.setdefault("models", {})
    if models.get("dense") != dense:
      models["dense"] = dense
      run_dir.write_eval_results(results)
  distributed.on_primary(seed_dense)
  return evaluate_run(run_dir.path, eval_config, mesh=mesh, log=log)


def _compare(config, job: Job, methods, ratios, seeds, eval_config, directory: ComparisonDir,
             log) -> dict:
  params = job.load_params()
  cache = {}

  def similarities_fn():
    if "sim" not in cache:
      cache["sim"] = baselines.similarities(Llama.from_params(job.model_cfg, params), job.tokens)
    return cache["sim"]

  directories: dict[str, list[RunDir]] = {}
  for name in methods:
    runs = [None] if baselines.METHODS[name].ranking != "random" else seeds
    directories[name] = []
    for seed in runs:
      run_dir = directory.method(name, seed, seeds[0] if seeds else None)
      done = distributed.on_primary(
          lambda: run_dir.holds_results(ratios, method=name, seed=seed))
      if done:
        log(f"{name}{'' if seed is None else f' (seed {seed})'}: reusing {run_dir}")
      else:
        run_method(config, job, name, ratios, params, similarities_fn, log, run_dir, seed=seed)
      directories[name].append(run_dir)

  dense = _dense_entry(directory, config, job, params, eval_config, log)
  params = None  # the pruned models are read from their checkpoints, one at a time
  cache.clear()
  evaluations = {name: [_evaluate_method(d, dense, eval_config, job.mesh, log) for d in dirs]
                 for name, dirs in directories.items()}
  result = comparison_report.summarize(job, dense, evaluations,
                                       {n: [d.path for d in dirs]
                                        for n, dirs in directories.items()},
                                       ratios, eval_config)
  distributed.on_primary(lambda: comparison_report.write(directory, result))
  log(f"wrote {directory.markdown_file}")
  return result
