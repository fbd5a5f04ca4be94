"""One healing run over a run directory: the pruned model of a search run, trained and saved.

`heal_run(run_dir, ratio, heal_config)` trains the pruned model of a search run and writes
`<run_dir>/healed/ratio_<r>/`:
  params/, model.json, tokenizer/   the healed model (LoRA merged), a pruned checkpoint that
                                    `checkpoint.load_pruned(run_dir, r, healed=True)` restores
  train/                            Orbax checkpoints of the training state, every
                                    `checkpoint_every` steps (an interrupted run resumes from the
                                    latest to the identical loss curve)
  healing.json                      settings, data, and the loss curve (train and held-out)
  healing.png                       the loss curve
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from finercut_jax.evaluation.plots import plot_healing
from finercut_jax.evaluation.run import heldout_for_run, resolve_eval_config
from finercut_jax.healing.data import training_data
from finercut_jax.healing.lora import HealMethod, add_lora
from finercut_jax.healing.settings import check_config, lora_targets, resolve_heal_config
from finercut_jax.healing.trainer import Trainer, train
from finercut_jax.model import checkpoint
from finercut_jax.model.loading import load_tokenizer
from finercut_jax.model.modules import Llama
from finercut_jax.parallel import distributed
from finercut_jax.parallel.sharding import make_mesh
from finercut_jax.rundir import RunDir


def _compute_dtype(c):
  if c.compute_dtype != "auto":
    return jnp.dtype(c.compute_dtype)
  return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def _fingerprint(c, data_info: dict, source_meta: dict) -> dict:
  settings = json.loads(c.to_json())
  settings.pop("enabled", None)
  settings.pop("checkpoint_every", None)
  settings.pop("eval_every", None)
  return {"settings": settings, "data": data_info, "model": source_meta}


def heal_run(run_dir: str, ratio: float, heal_config=None, *, mesh=None, log=print,
             progress: bool = True) -> str:
  """Heals the pruned model of `run_dir` at `ratio`; returns the healed checkpoint directory.
  Every process of a multi-process job calls it."""
  c = resolve_heal_config(heal_config)
  check_config(c)
  run = RunDir(run_dir)
  run_config = distributed.on_primary(run.read_config)
  if mesh is None:  # the search's mesh: the batch over its `cand` axis, weights over `model`
    scorer = run_config.get("scorer", {})
    mesh = make_mesh(cand=int(scorer.get("mesh_cand", 0)) or None,
                     model=int(scorer.get("mesh_model", 1)))
  dtype = _compute_dtype(c)
  model, tokenizer = checkpoint.load_pruned(run_dir, ratio, dtype=jnp.float32)
  if tokenizer is None:
    tokenizer = load_tokenizer(run_config["model"]["path"])
  params = model.params()
  model = Llama.from_params(model.config, params, present=model.present, dtype=dtype)
  eval_config = resolve_eval_config(run_config.get("eval"))
  eval_config.perplexity.seq_len = int(c.seq_len)
  # At least one micro-batch of held-out windows (the training text starts after all of it).
  eval_config.perplexity.num_tokens = max(int(eval_config.perplexity.num_tokens),
                                          int(c.micro_batch) * int(c.seq_len))
  calibration = np.asarray(distributed.on_primary(
      lambda: run.read_tokens(missing_ok=False).tolist()), np.int32)
  heldout, info = heldout_for_run(run_config, tokenizer, eval_config, calibration)
  data_ = training_data(tokenizer, c, run_config, calibration, heldout, info["source"],
                        info["offset"])
  directory = run.checkpoint_dir(ratio, healed=True)
  pruned_meta = checkpoint.read_meta(run.checkpoint_dir(ratio))
  fingerprint = _fingerprint(c, data_.info, {"keep": pruned_meta["keep"],
                                             "dtype": pruned_meta["dtype"], "ratio": ratio})
  if c.method == HealMethod.LORA:
    add_lora(model, rank=int(c.lora.rank), alpha=float(c.lora.alpha),
             dropout=float(c.lora.dropout), targets=lora_targets(c), seed=int(c.seed))
  log(f"healing {run_dir} at ratio {ratio:g}: {c.method}, {c.steps} steps of "
      f"{c.batch_size} x {c.seq_len} tokens on {data_.info['windows']} windows of "
      f"{data_.info['source']}")
  trainer = Trainer(model, c, mesh)
  history = train(trainer, data_, run.healing_record_file(ratio), run.healing_train_dir(ratio),
                  fingerprint, log=log, progress=progress)
  healed = trainer.model()
  final = Llama.from_params(healed.config, jax.tree.map(
      lambda x: x.astype(pruned_meta["dtype"]), healed.params()), present=healed.present)
  checkpoint.save_model(directory, final, tokenizer=tokenizer,
                        source=f"{run_dir} ratio {ratio:g}, healed ({c.method})",
                        extra={"healing": fingerprint})

  def plot():
    plot_healing(history, run.healing_plot_file(ratio))
  distributed.on_primary(plot)
  first, last = history["heldout"][0]["loss"], history["heldout"][-1]["loss"]
  log(f"healed: held-out loss {first:.4f} -> {last:.4f}; wrote {directory}")
  return directory
