"""Evaluating a search run: the dense model and the pruned model at every ratio of `masks.json`.

`evaluate_run(run_dir, eval_config)` writes into the run directory
  eval_results.json    per model: perplexity, benchmarks, throughput (rewritten after each model,
                       so an interrupted evaluation keeps what it finished)
  layer_map.png, score_per_step.png, metrics_vs_ratio.png
  report.md            the tables and the pictures together
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from ml_collections import config_dict

from finercut_jax.evaluation import harness_tasks, perplexity, plots, report, throughput
from finercut_jax.evaluation.lm import EvalModel, ScoringConfig
from finercut_jax.model import checkpoint, loading
from finercut_jax.parallel import distributed
from finercut_jax.rundir import Ranking, RunDir
from finercut_jax.rundir.atomic import read_json
from finercut_jax.rundir.sections import override_section


def default_eval_config() -> ml_collections.ConfigDict:
  """Defaults sized for SmolLM2-135M on a 2-core CPU: dense + one ratio in a few minutes.

  Raise `limit` (the paper: 1000) and add "mmlu" to `tasks` on an accelerator. MMLU's limit is
  per subject (57 subjects, 5-shot prompts of ~600 tokens), as `lm_eval --limit` does.
  """
  c = ml_collections.ConfigDict()
  c.enabled = True
  # Comma-separated; any of arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq,
  # openbookqa, lambada, mmlu.
  c.tasks = "arc_easy,arc_challenge,piqa,hellaswag,winogrande,boolq,openbookqa,lambada"
  c.limit = 5  # first documents per task (MMLU: per subject); 0 = all
  c.mmlu_limit = config_dict.placeholder(int)  # per-subject limit for MMLU; None: `limit`
  c.ratios = ""  # comma-separated subset of masks.json's ratios; "": all of them

  c.perplexity = ml_collections.ConfigDict()
  c.perplexity.enabled = True
  c.perplexity.source = ""  # "": the calibration source, from its end (held out)
  c.perplexity.num_tokens = 512
  c.perplexity.seq_len = 0  # 0: the calibration sequence length
  c.perplexity.batch_size = 2

  c.throughput = ml_collections.ConfigDict()
  c.throughput.enabled = True
  c.throughput.batch_size = 1
  c.throughput.prompt_len = 64
  c.throughput.decode_steps = 16
  c.throughput.repeats = 3

  c.scoring = ml_collections.ConfigDict()
  c.scoring.seq_buckets = "32,64,128,256,512,768,1024,1536,2048"
  c.scoring.slot_buckets = "16,64,256,1024"
  c.scoring.tokens_per_batch = 256  # rows per batch = this // bucket length; 8192+ on accelerators
  c.scoring.max_batch = 64
  # The harness's max_length: 0 is lm-eval's own choice, the model's max_position_embeddings
  # (longer prompts, e.g. some 5-shot MMLU ones, are cut on the left).
  c.scoring.max_length = 0

  c.plots = True
  return c


def resolve_eval_config(eval_config=None) -> ml_collections.ConfigDict:
  """`default_eval_config()` overridden by whatever fields `eval_config` sets (a partial config,
  e.g. a job config's `eval` section holding only `enabled`, gets every other default)."""
  return override_section(default_eval_config(), eval_config, "eval",
                          "finercut_jax/evaluation/run.py")


def _csv(value) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in value]


def scoring_config(c) -> ScoringConfig:
  return ScoringConfig(
      seq_buckets=tuple(int(v) for v in _csv(c.seq_buckets)),
      slot_buckets=tuple(int(v) for v in _csv(c.slot_buckets)),
      tokens_per_batch=int(c.tokens_per_batch), max_batch=int(c.max_batch),
      max_length=int(c.max_length))


def resolve_max_length(eval_config, max_position_embeddings: int):
  """`scoring.max_length` 0 becomes the model's `max_position_embeddings`, as lm-eval's HFLM
  takes it from the model config."""
  if not int(eval_config.scoring.max_length):
    eval_config.scoring.max_length = int(max_position_embeddings)
  return eval_config


def run_eval_config(run_dir: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The evaluation settings a run was configured with (its config.json's `eval` section),
  `overrides` (flat, dotted keys) on top. An explicit evaluation runs even if the run had
  evaluation disabled."""
  config = resolve_eval_config(RunDir(run_dir).read_config().get("eval"))
  config.update_from_flattened_dict(dict(overrides or {}))
  config.enabled = True
  return config


def heldout_for_run(run_config: dict, tokenizer, eval_config,
                    calibration: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """Held-out perplexity tokens `int32 [n]` for a run, and where they came from. When the text
  is the calibration source, it starts after the calibration tokens `calibration` `[N, T]`."""
  data_cfg = run_config.get("data", {})
  calib_source = data_cfg.get("source", "packaged")
  n, t = int(data_cfg.get("num_sequences", 10)), int(data_cfg.get("seq_len", 256))
  source = eval_config.perplexity.source or calib_source
  # The calibration set is the first N*T tokens of its source: start after it.
  offset = n * t if source == calib_source else 0
  tokens = perplexity.heldout_tokens(tokenizer, source, offset, eval_config.perplexity.num_tokens,
                                     calibration=calibration if offset else None)
  return tokens, {"source": source, "offset": offset, "num_tokens": int(len(tokens)),
                  "seq_len": int(eval_config.perplexity.seq_len or t)}


def _task_limits(eval_config) -> dict:
  limit = int(eval_config.limit) or None
  limits = {t: limit for t in _csv(eval_config.tasks)}
  if "mmlu" in limits and eval_config.get("mmlu_limit") is not None:
    limits["mmlu"] = int(eval_config.mmlu_limit) or None
  return limits


def result_settings(eval_config) -> dict:
  """What each stored result was computed with; a result is reused only under the same settings.
  Per task: its document limit and the harness's max_length; perplexity: its text and windows;
  throughput: its shapes and repeats."""
  p, tp = eval_config.perplexity, eval_config.throughput
  return {
      "tasks": {t: {"limit": limit, "max_length": int(eval_config.scoring.max_length)}
                for t, limit in _task_limits(eval_config).items()},
      "perplexity": {"source": p.source, "num_tokens": int(p.num_tokens),
                     "seq_len": int(p.seq_len)} if p.enabled else None,
      "throughput": {"batch_size": int(tp.batch_size), "prompt_len": int(tp.prompt_len),
                     "decode_steps": int(tp.decode_steps), "repeats": int(tp.repeats)}
      if tp.enabled else None}


def pending_work(previous: dict | None, settings: dict) -> dict:
  """What of one model's evaluation is not in `previous` under these settings."""
  previous = previous or {}
  stored = previous.get("benchmarks", {})
  return {
      "tasks": [t for t, s in settings["tasks"].items() if stored.get(t, {}).get("settings") != s],
      "perplexity": settings["perplexity"] is not None and (
          previous.get("perplexity", {}).get("settings") != settings["perplexity"]),
      "throughput": settings["throughput"] is not None and (
          previous.get("throughput", {}).get("settings") != settings["throughput"])}


def evaluate_model(model: EvalModel, tokenizer, eval_config, *, heldout=None, scoring=None,
                   log=print, previous: dict | None = None) -> dict:
  """Perplexity and benchmarks of one model, as a JSON-ready dict. What `previous` (this model's
  earlier entry) holds under the same settings is reused, and what it holds for other tasks or
  settings is kept: results are merged, never discarded. Throughput: `throughput.measure`."""
  settings = result_settings(eval_config)
  todo = pending_work(previous, settings)
  out: dict = {k: v for k, v in (previous or {}).items() if k not in ("seconds",)}
  out.update({"name": model.name, "num_params": model.num_params(),
              "num_removed": model.num_removed,
              "num_attn": model.num_attn, "num_ffn": model.num_ffn,
              "keep": model.keep.tolist()})
  start = time.perf_counter()
  if todo["perplexity"] and heldout is not None:
    tokens, info = heldout
    out["perplexity"] = {**perplexity.perplexity(model, tokens, info["seq_len"],
                                                 eval_config.perplexity.batch_size), **info,
                         "settings": settings["perplexity"]}
    log(f"  {model.name}: held-out perplexity {out['perplexity']['perplexity']:.3f}")
  tasks = list(settings["tasks"])
  merged = dict(out.get("benchmarks", {}))
  if todo["tasks"]:
    results = harness_tasks.evaluate_tasks(model, tokenizer, todo["tasks"],
                                           _task_limits(eval_config), scoring=scoring, log=log)
    merged.update({t: {**r.summary(), "settings": settings["tasks"][t]}
                   for t, r in results.items()})
  if merged:
    out["benchmarks"] = merged
  if tasks:
    # The average is over the tasks asked for now; results of other tasks stay stored beside it.
    out["average"] = harness_tasks.average({t: merged[t] for t in tasks})
    out["average_tasks"] = tasks
    out["limits"] = _task_limits(eval_config)
  out["seconds"] = time.perf_counter() - start
  return out


class _RunEvaluation:
  """One evaluation of a run: what every model's evaluation needs (the run, its config, the
  settings, the mesh), the tokenizer and held-out text, each made once when a model first needs
  it (a model's checkpoint may carry the tokenizer; else the run's source model gives it), and
  the results, written after each model so that an interrupted evaluation keeps what it did."""

  def __init__(self, run: RunDir, run_config: dict, eval_config, results: dict, *, mesh, log):
    self.run, self.run_config, self.eval_config = run, run_config, eval_config
    self.results, self.mesh, self.log = results, mesh, log
    self.settings = result_settings(eval_config)
    self.scoring = scoring_config(eval_config.scoring)
    self._tokenizer, self._heldout = None, None

  def tokenizer(self, model_tokenizer=None):
    if self._tokenizer is None:
      self._tokenizer = model_tokenizer
    if self._tokenizer is None:
      self._tokenizer = loading.load_tokenizer(self.run_config["model"]["path"])
    return self._tokenizer

  def heldout(self):
    if self._heldout is None:
      calibration = distributed.on_primary(lambda: (
          None if (t := self.run.read_tokens()) is None else t.tolist()))
      self._heldout = heldout_for_run(
          self.run_config, self.tokenizer(), self.eval_config,
          None if calibration is None else np.asarray(calibration, np.int32))
    return self._heldout

  def write(self) -> None:
    """The results as they stand (a failed write stops every process, not only process 0)."""
    distributed.on_primary(lambda: self.run.write_eval_results(self.results))

  def evaluate(self, model: EvalModel, tokenizer, previous: dict | None, todo: dict) -> dict:
    heldout = self.heldout() if todo["perplexity"] else None
    return evaluate_model(model, tokenizer, self.eval_config, heldout=heldout,
                          scoring=self.scoring, log=self.log, previous=previous)

  def load_model(self, key: str, masks: dict, dense_model):
    """The model `key` ("dense" or a ratio of masks.json) and where it came from: the run's
    source (dense), its pruned checkpoint, or, without one (config.checkpoint=False), the dense
    weights pruned by the mask. Returns (EvalModel, tokenizer or None, source, the dense `Llama`
    to keep for later mask-pruned ratios: only when the run wrote no checkpoints, else None)."""
    run, run_config, mesh = self.run, self.run_config, self.mesh
    if key == "dense":
      dense, tokenizer = checkpoint.load_source_model(run.path, mesh=mesh, run_config=run_config)
      # Kept only where a ratio has no checkpoint and is pruned from it: never a second copy else.
      keep_dense = dense if not run_config.get("checkpoint", True) else None
      return EvalModel.wrap(dense, "dense"), tokenizer, "source", keep_dense
    name, keep = f"ratio {float(key):g}", np.asarray(masks[key], bool)
    try:
      pruned_model, tokenizer = checkpoint.load_pruned(run.path, float(key), mesh=mesh)
    except FileNotFoundError as e:
      if run_config.get("checkpoint", True):
        raise FileNotFoundError(f"{e}; the run writes pruned checkpoints, so this one is missing "
                                f"or incomplete (an interrupted save?): rerun python -m "
                                f"finercut_jax.main with this run's config to write it") from None
      if dense_model is None:
        dense_model = checkpoint.load_source_model(run.path, mesh=mesh, run_config=run_config)[0]
      return EvalModel(dense_model.prune(keep), name), None, "mask", dense_model
    model = EvalModel.wrap(pruned_model, name)
    if not np.array_equal(model.keep, keep):
      raise ValueError(f"{run}: the checkpoint's keep mask differs from "
                       f"{os.path.basename(run.masks_file)} at ratio {key}")
    return model, tokenizer, "checkpoint", None

  def models(self, masks: dict, ratios: list[str], done: dict) -> None:
    """Evaluates, one model at a time (each loaded onto the mesh, evaluated, then freed), the
    dense model and each ratio not in `done`, with its throughput."""
    tp, log, models = self.eval_config.throughput, self.log, self.results["models"]
    prompt, dense_model = None, None
    for key in ["dense"] + ratios:
      previous = done.get(key)
      todo = pending_work(previous, self.settings)
      if previous is not None and not (todo["tasks"] or todo["perplexity"] or todo["throughput"]):
        log(f"  {previous['name']}: reusing the results in {self.run.eval_results_file}")
        models[key] = previous
        self.write()
        continue
      model, model_tokenizer, source, dense_model = self.load_model(key, masks, dense_model)
      if source == "mask":
        log(f"  {model.name}: no pruned checkpoint (config.checkpoint=False): the dense weights "
            f"pruned by the mask")
      entry = {**self.evaluate(model, self.tokenizer(model_tokenizer), previous, todo),
               "ratio": 0.0 if key == "dense" else float(key), "source": source}
      if todo["throughput"]:
        if prompt is None:  # the same prompts for every model
          prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size,
                                                     (tp.batch_size, tp.prompt_len))
        entry["throughput"] = {**throughput.measure(model, batch_size=tp.batch_size,
                                                    prompt_len=tp.prompt_len,
                                                    decode_steps=tp.decode_steps,
                                                    repeats=tp.repeats, tokens=prompt),
                               "settings": self.settings["throughput"]}
        log(f"  {entry['name']}: prefill {entry['throughput']['prefill_tokens_per_s']:.1f} "
            f"tok/s, decode {entry['throughput']['decode_tokens_per_s']:.1f} tok/s")
      models[key] = entry
      self.write()
      del model
    dense_tp = models.get("dense", {}).get("throughput")
    for key, entry in models.items():
      if key != "dense" and dense_tp and "throughput" in entry:
        entry["throughput_vs_dense"] = throughput.relative_to(dense_tp, entry["throughput"])
    self.write()

  def healed(self, ratios: list[str]) -> None:
    """Evaluates the healed model of each ratio that has one (`finercut_jax.heal`), beside the
    pruned one; a stored result (in `results["healed"]`) is reused only for the same healing run
    and settings."""
    healed = previous = self.results["healed"]
    for key in ratios:
      directory = self.run.checkpoint_dir(float(key), healed=True)
      meta = distributed.on_primary(lambda: checkpoint.read_meta(directory))
      if meta is None or "healing" not in meta:
        continue
      stored = previous.get(key)
      if stored is not None and stored.get("healing") != meta["healing"]:
        stored = None  # another healing run: nothing of it is reusable
      todo = pending_work(stored, dict(self.settings, throughput=None))
      if stored is not None and not (todo["tasks"] or todo["perplexity"]):
        healed[key] = stored
        self.write()
        continue
      model, model_tokenizer = checkpoint.restore_pruned(directory, mesh=self.mesh)
      history = distributed.on_primary(
          lambda: read_json(self.run.healing_record_file(float(key)), {}))
      held = history.get("heldout", [])
      healed[key] = {
          **self.evaluate(EvalModel(model, f"ratio {float(key):g} healed"),
                          self.tokenizer(model_tokenizer), stored, todo),
          "ratio": float(key), "source": "healed", "healing": meta["healing"],
          "healing_loss": {"heldout_before": held[0]["loss"] if held else None,
                           "heldout_after": held[-1]["loss"] if held else None,
                           "steps": len(history.get("steps", []))}}
      self.write()
      del model


def evaluate_run(run_dir: str, eval_config=None, *, mesh=None,
                 log=distributed.primary_print) -> dict:
  """Evaluates the dense model and each pruned ratio of a run; writes results, plots, report.

  Rerunning with the same settings reuses the models already in `eval_results.json` (matched by
  keep mask), so an interrupted evaluation resumes. With `mesh` the models are loaded onto it,
  sharded by the sharding rules, one at a time. On several processes every process calls this;
  process 0 reads and writes the run directory and logs.
  """
  if not distributed.is_primary():
    log = lambda *_: None  # noqa: E731
  run = RunDir(run_dir)
  eval_config = resolve_eval_config(eval_config)
  run_config = distributed.on_primary(run.read_config)
  if not int(eval_config.scoring.max_length):
    model_path = loading.resolve_path(run_config["model"]["path"])
    resolve_max_length(eval_config, distributed.on_primary(
        lambda: loading.load_config(model_path).max_position_embeddings))
  masks = distributed.on_primary(lambda: _stored_masks(run))
  if not masks:
    raise FileNotFoundError(f"{run.masks_file} is missing: the search has not finished; "
                            f"rerun python -m finercut_jax.main with this run's config")
  ranking = distributed.on_primary(lambda: None if (r := run.read_ranking()) is None
                                   else r.to_json())
  ranking = None if ranking is None else Ranking.from_json(ranking, run.ranking_file)
  previous = distributed.on_primary(run.read_eval_results)
  wanted = _csv(eval_config.ratios)
  unknown = [w for w in wanted if not any(float(r) == float(w) for r in masks)]
  if unknown:
    raise ValueError(f"eval.ratios {', '.join(unknown)} not in {run.masks_file} (it has "
                     f"{', '.join(sorted(masks, key=float))}); add them to search.mask_ratios "
                     f"and rerun the search, which resumes without rescoring")
  ratios = sorted((r for r in masks if not wanted or any(float(r) == float(w) for w in wanted)),
                  key=float)
  # Results of earlier evaluations stay, whatever their settings: each stored result carries its
  # own settings and is reused only under the same ones (`pending_work`).
  reusable = previous.get("models", {})

  log(f"evaluating {run}: dense + ratios {ratios}")
  results = {"run_dir": os.path.abspath(run.path),
             "model": run_config.get("model", {}).get("path") or (ranking.model if ranking
                                                                   else None),
             "eval_config": json.loads(eval_config.to_json()), "models": dict(reusable)}
  keeps = {r: np.asarray(masks[r], bool) for r in ratios}
  keeps = {"dense": np.ones_like(np.asarray(next(iter(masks.values())), bool)), **keeps}
  done = {k: reusable[k] for k, keep in keeps.items()
          if k in reusable and reusable[k].get("keep") == keep.tolist()}
  evaluation = _RunEvaluation(run, run_config, eval_config, results, mesh=mesh, log=log)
  evaluation.models(masks, ratios, done)
  results["healed"] = dict(previous.get("healed", {}))
  evaluation.healed(ratios)
  if not results["healed"]:
    del results["healed"]

  def write_plots_and_report():
    if eval_config.plots:
      results["plots"] = {k: os.path.basename(v) for k, v in plots.make_plots(
          run, ranking, {r: masks[r] for r in ratios} or masks, results,
          results["model"]).items()}
      run.write_eval_results(results)
    run.write_report(report.render(results, ranking, run_config))
  distributed.on_primary(write_plots_and_report)
  log(f"wrote {run.eval_results_file} and {run.report_file}")
  return results


def _stored_masks(run: RunDir) -> dict[str, list] | None:
  """masks.json as stored (`{ratio key: [[bool, bool], ...]}`), for sharing across processes."""
  masks = run.read_masks()
  return None if masks is None else {k: v.tolist() for k, v in masks.items()}
