r"""FinerCut beside the block- and sublayer-pruning baselines, on one model, one set of
calibration tokens and one evaluation:

  python -m finercut_jax.compare --config=configs/smollm2_135m.py

`--methods` (default: all of `baselines.METHODS`), `--ratios` (fractions of sublayers; block
methods remove the nearest whole-block count), `--seeds` (the random methods' draws),
`--limit` (documents per task) and `--comparison_dir` (default `<config.run_dir>_comparison`);
the config's own fields are overridable as for `finercut_jax.main` (`--config.eval.tasks=...`).

The comparison directory holds
  comparison_state.json     what the comparison was made with: model files, tokenizer, dtype and
                            calibration tokens; another model or other tokens are refused
  calibration_tokens.npy    the tokens every method ranked on
  dense_eval.json           the dense model's evaluation, made once for every method
  <method>/                 a run directory per method (config.json, calibration_tokens.npy,
                            ranking.json, masks.json, pruned/ratio_*/ Orbax checkpoints,
                            eval_results.json, report.md, layer_map.png); random methods hold
                            their first seed there and each other seed in <method>/seed_<s>/
  comparison.json, comparison.md, accuracy_vs_ratio.png, perplexity_vs_ratio.png, layer_maps.png

Rerunning reuses every method whose run directory already holds the requested ratios, and every
evaluation already made with the same settings; an interrupted greedy search resumes.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

from absl import app, flags

from finercut_jax.jobs import cli
from finercut_jax.main import CONFIG
_METHODS = flags.DEFINE_string("methods", "all", "Comma-separated methods, or 'all'.")
_RATIOS = flags.DEFINE_string("ratios", "0.125,0.25,0.375",
                              "Comma-separated fractions of sublayers to remove.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Seeds of the random methods.")
_LIMIT = flags.DEFINE_integer("limit", 30, "Documents per task (0: all); MMLU: per subject.")
_DIR = flags.DEFINE_string("comparison_dir", None,
                           "Where the comparison goes; default <config.run_dir>_comparison.")

DEFAULT_RATIOS = (0.125, 0.25, 0.375)


class ComparisonError(ValueError):
  """The comparison directory or the request does not fit."""


def _csv(text: str) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_methods(text: str) -> list[str]:
  from finercut_jax.search.baselines import METHODS, get_method
  names = list(METHODS) if text.strip() in ("", "all") else _csv(text)
  for name in names:
    get_method(name)  # an unknown name fails here
  return list(dict.fromkeys(names))


def check_ratios(methods: list[str], ratios: list[float], num_layers: int) -> None:
  """Every method can remove something at every ratio (see `baselines.units_removed`)."""
  from finercut_jax.search.baselines import get_method, units_removed
  if not ratios:
    raise ComparisonError("no ratios given")
  for name in methods:
    for r in ratios:
      units_removed(get_method(name), r, num_layers)


def method_dir(comparison_dir: str, method: str, seed: int | None = None,
               first_seed: int | None = None) -> str:
  base = os.path.join(comparison_dir, method)
  return base if seed is None or seed == first_seed else os.path.join(base, f"seed_{seed}")


# ----------------------------------------------------------------------------- the state


def _check_state(comparison_dir: str, fingerprint: dict, tokens) -> None:
  """A comparison directory belongs to one model, dtype and set of calibration tokens."""
  import numpy as np

  from finercut_jax.rundir.atomic import read_json
  state = read_json(os.path.join(comparison_dir, "comparison_state.json"))
  tokens_path = os.path.join(comparison_dir, "calibration_tokens.npy")
  if os.path.exists(tokens_path) and not np.array_equal(np.load(tokens_path), tokens):
    raise ComparisonError(f"{comparison_dir} was made with other calibration tokens; use another "
                          f"--comparison_dir or the data settings it was made with")
  if state is None:
    return
  stored = state.get("fingerprint", {})
  differ = [k for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)]
  if differ:
    names = {"tokens_sha256": "calibration tokens", "weights": "model weights"}
    raise ComparisonError(f"{comparison_dir} was made with another "
                          f"{', '.join(names.get(k, k) for k in differ)}; use another "
                          f"--comparison_dir")


def _write_state(comparison_dir: str, fingerprint: dict, tokens) -> None:
  from finercut_jax.parallel import distributed
  from finercut_jax.rundir import atomic

  def write():
    os.makedirs(comparison_dir, exist_ok=True)
    atomic.atomic_save_npy(os.path.join(comparison_dir, "calibration_tokens.npy"), tokens)
    atomic.atomic_write_json(os.path.join(comparison_dir, "comparison_state.json"),
                         {"fingerprint": fingerprint})
  distributed.on_primary(write)


# ----------------------------------------------------------------------------- the methods


def _method_config(config, method, ratios, run_dir, seed=None):
  """The job config as the method ran it (written to its run directory's config.json)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.run_dir = run_dir
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


def _is_done(run_dir: str, ratios: list[float], method: str, seed) -> bool:
  """A method's run directory holds its results at every requested ratio."""
  from finercut_jax.rundir.atomic import read_json
  masks = read_json(os.path.join(run_dir, "masks.json"))
  config = read_json(os.path.join(run_dir, "config.json")) or {}
  return (masks is not None and os.path.exists(os.path.join(run_dir, "ranking.json"))
          and config.get("method") == method and config.get("seed") == seed
          and all(f"{r:g}" in masks for r in ratios))


def _masks(method, steps_for, ratios, num_layers):
  """`{ratio: keep [L, 2]}`: each ratio's first `units_removed` removals of its ordering."""
  from finercut_jax import search
  from finercut_jax.search.baselines import units_removed
  out = {}
  for r in ratios:
    n = units_removed(method, r, num_layers)
    out[f"{r:g}"] = search.keep_mask(num_layers, [s["sublayers"] for s in steps_for(n)[:n]])
  return out


def _ranking(job, method, steps, extra=None) -> dict:
  return {"model": job.model_path, "num_layers": job.model_cfg.num_layers, "method": method.name,
          "pool": method.pool or method.unit, "metric": method.metric,
          "steps": [{k: v for k, v in s.items() if k != "scores"} for s in steps], **(extra or {})}


def _search_steps(config, job, method, params, run_dir, n_steps):
  """The greedy search of a `search` method (resumes from its state file)."""
  from tqdm import tqdm

  from finercut_jax import search
  from finercut_jax.parallel import distributed
  finercut = method.name.startswith("finercut")
  spec = search.SearchSpec(num_layers=job.model_cfg.num_layers, pool=method.pool,
                           num_steps=n_steps,
                           protect_front=config.search.protect_front if finercut else None)
  scorer = job.scorer(config.scorer, params, method.metric, len(spec.pool_candidates()))
  bar = tqdm(total=spec.total_steps, desc=method.name, unit="step", file=sys.stdout,
             disable=not distributed.is_primary())

  def on_step(record):
    bar.set_postfix_str(f"removed {record['kind']}{record['block']} score={record['score']:.4g}")
    bar.update(1)
  steps = search.greedy_search(scorer, spec, state_path=os.path.join(run_dir, "search_state.json"),
                               fingerprint=dict(job.fingerprint, metric=method.metric),
                               on_step=on_step)
  bar.close()
  del scorer
  return steps


def run_method(config, job, name: str, ratios: list[float], params, similarities_fn, log,
               seed: int | None = None, run_dir: str | None = None) -> str:
  """Ranks with one method and writes its run directory; returns the directory."""
  from finercut_jax import rundir
  from finercut_jax.search import baselines
  method = baselines.get_method(name)
  L = job.model_cfg.num_layers
  n_max = max(baselines.units_removed(method, r, L) for r in ratios)
  rundir.write_start(run_dir, _method_config(config, method, ratios, run_dir, seed), job.tokens)
  extra = {}
  if method.ranking == "search":
    steps = _search_steps(config, job, method, params, run_dir, n_max)
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
      n = baselines.units_removed(method, r, L)
      first, distance = baselines.gromov_run(sim, n)
      runs[f"{r:g}"] = {"first_block": first, "num_blocks": n, "angular_distance": distance}
    # The best run of n blocks need not contain the best run of fewer: masks are per ratio.
    extra = {"nested": False, "runs": runs}
  else:
    sim = similarities_fn()
    steps = (baselines.shortgpt_steps(sim) if name == "shortgpt"
             else baselines.llm_drop_steps(sim, joint=name == "llm_drop_joint"))
    steps_for = lambda n: steps  # noqa: E731
  masks = _masks(method, steps_for, ratios, L)
  rundir.save_results(run_dir, _ranking(job, method, steps, extra), masks,
                      model_cfg=job.model_cfg, params=params, tokenizer=job.tokenizer,
                      source=job.model_path, save_checkpoints=True)
  log(f"{name}{'' if seed is None else f' (seed {seed})'}: " + "; ".join(
      f"{r}: {int((~k).sum())} sublayers" for r, k in masks.items()))
  return run_dir


# ----------------------------------------------------------------------------- evaluation


def comparison_eval_config(config, ratios: list[float], limit: int, max_position_embeddings: int):
  """The one evaluation every model of the comparison gets: the config's tasks and perplexity
  settings, `limit` documents per task, no throughput (structure, not speed, is compared)."""
  from finercut_jax.evaluation.run import resolve_eval_config, resolve_max_length
  c = resolve_eval_config(copy.deepcopy(config.eval))
  c.enabled = True
  c.limit = limit
  c.ratios = ",".join(f"{r:g}" for r in ratios)
  c.throughput.enabled = False
  return resolve_max_length(c, max_position_embeddings)


def _dense_entry(comparison_dir, config, job, params, eval_config, log) -> dict:
  """The dense model's evaluation, made once (and reused from dense_eval.json)."""
  import json

  from finercut_jax.parallel import distributed
  from finercut_jax.rundir import atomic
  from finercut_jax.evaluation import run as eval_run
  from finercut_jax.evaluation.lm import EvalModel
  from finercut_jax.model.modules import Llama
  path = os.path.join(comparison_dir, "dense_eval.json")
  stored = distributed.on_primary(lambda: atomic.read_json(path))
  model = EvalModel(Llama.from_params(job.model_cfg, params), "dense")
  settings = eval_run._settings(eval_config)
  pending = eval_run._pending(stored, settings)
  if stored is not None and not (pending["tasks"] or pending["perplexity"]):
    log("dense: reusing dense_eval.json")
    return stored
  heldout = eval_run.heldout_for_run(json.loads(config.to_json()), job.tokenizer, eval_config,
                                     comparison_dir)
  entry = {**eval_run.evaluate_model(model, job.tokenizer, eval_config, heldout=heldout,
                                     scoring=eval_run.scoring_config(eval_config.scoring),
                                     log=log, previous=stored),
           "ratio": 0.0, "source": "source"}
  distributed.on_primary(lambda: atomic.atomic_write_json(path, entry))
  return entry


def _evaluate_method_dir(run_dir, dense, eval_config, mesh, log) -> dict:
  """A method's pruned models, with the shared dense result put in place first so that
  `evaluate_run` reuses it rather than evaluating the dense model again."""
  from finercut_jax.parallel import distributed
  from finercut_jax.rundir import atomic
  from finercut_jax.evaluation import evaluate_run
  path = os.path.join(run_dir, "eval_results.json")

  def seed_dense():
    results = atomic.read_json(path, {})
    models = results.setdefault("models", {})
    if models.get("dense") != dense:
      models["dense"] = dense
      atomic.atomic_write_json(path, results)
  distributed.on_primary(seed_dense)
  return evaluate_run(run_dir, eval_config, mesh=mesh, log=log)


# ----------------------------------------------------------------------------- the command


def run(config, *, methods=None, ratios=DEFAULT_RATIOS, seeds=(0, 1, 2), limit: int = 30,
        comparison_dir: str | None = None, log=print) -> dict:
  """Runs (or resumes) the comparison; returns what comparison.json holds."""
  from finercut_jax import main
  from finercut_jax.search import baselines
  from finercut_jax.parallel import distributed
  from finercut_jax.rundir import atomic

  methods = parse_methods(",".join(methods) if methods else "all")
  ratios = sorted({float(r) for r in ratios})
  seeds = [int(s) for s in seeds]
  if not seeds and any(baselines.METHODS[m].ranking == "random" for m in methods):
    raise ComparisonError("the random methods need at least one seed (--seeds)")
  if limit < 0:
    raise ComparisonError(f"--limit must be >= 0, got {limit}")
  comparison_dir = comparison_dir or f"{config.run_dir.rstrip('/')}_comparison"
  config = copy.deepcopy(config)
  with config.unlocked():
    config.run_dir = os.path.join(comparison_dir, methods[0])  # validated like any run directory
  job = main.prepare(config)
  if not distributed.is_primary():
    log = lambda *_: None  # noqa: E731
  check_ratios(methods, ratios, job.model_cfg.num_layers)
  eval_config = comparison_eval_config(config, ratios, limit,
                                       job.model_cfg.max_position_embeddings)
  distributed.on_primary(lambda: _check_state(comparison_dir, job.fingerprint, job.tokens))
  with contextlib.ExitStack() as lock:  # one job per comparison directory
    distributed.on_primary(lambda: lock.enter_context(atomic.run_lock(comparison_dir)) and None)
    _write_state(comparison_dir, job.fingerprint, job.tokens)
    return _compare(config, job, methods, ratios, seeds, eval_config, comparison_dir, log)


def _compare(config, job, methods, ratios, seeds, eval_config, comparison_dir, log) -> dict:
  import jax.numpy as jnp

  from finercut_jax.search import baselines
  from finercut_jax.parallel import distributed
  from finercut_jax.evaluation import comparison_report
  from finercut_jax.model.modules import Llama

  params = job.load_params(jnp.dtype(config.model.dtype))
  cache = {}

  def similarities_fn():
    if "sim" not in cache:
      cache["sim"] = baselines.similarities(Llama.from_params(job.model_cfg, params), job.tokens)
    return cache["sim"]

  directories: dict[str, list[str]] = {}
  for name in methods:
    runs = [None] if baselines.METHODS[name].ranking != "random" else seeds
    directories[name] = []
    for seed in runs:
      d = method_dir(comparison_dir, name, seed, seeds[0] if seeds else None)
      done = distributed.on_primary(lambda: _is_done(d, ratios, name, seed))
      if done:
        log(f"{name}{'' if seed is None else f' (seed {seed})'}: reusing {d}")
      else:
        run_method(config, job, name, ratios, params, similarities_fn, log, seed=seed,
                   run_dir=d)
      directories[name].append(d)

  dense = _dense_entry(comparison_dir, config, job, params, eval_config, log)
  params = None  # the pruned models are read from their checkpoints, one at a time
  cache.clear()
  evaluations = {name: [_evaluate_method_dir(d, dense, eval_config, job.mesh, log)
                        for d in dirs] for name, dirs in directories.items()}
  result = comparison_report.summarize(job, dense, evaluations, directories, ratios, eval_config)
  distributed.on_primary(lambda: comparison_report.write(comparison_dir, result))
  log(f"wrote {os.path.join(comparison_dir, 'comparison.md')}")
  return result


def main(argv):
  cli.start(argv)
  with cli.expected_errors():
    run(CONFIG.value, methods=parse_methods(_METHODS.value),
        ratios=[float(r) for r in _csv(_RATIOS.value)],
        seeds=[int(s) for s in _csv(_SEEDS.value)], limit=_LIMIT.value,
        comparison_dir=_DIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
