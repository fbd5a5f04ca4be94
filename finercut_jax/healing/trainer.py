"""The healing optimizer: compiled training and held-out steps, and the resumable step loop.

AdamW with linear warmup and cosine decay, gradient clipping by global norm, gradient
accumulation over micro-batches to the effective batch (a `lax.scan` inside one compiled step).
Parameters stay float32 (the master weights); compute runs in `compute_dtype` (bfloat16 on
accelerators by default). The batch is split over the mesh's `cand` axis (data parallelism) and
the weights over its `model` axis, as in the search. Orbax checkpoints of the training state every
`checkpoint_every` steps let an interrupted run resume to the identical loss curve.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from finercut_jax.healing.data import TrainingData, batch_indices
from finercut_jax.healing.lora import DropoutKey, merge_lora, trainable_parts
from finercut_jax.model.modules import Llama
from finercut_jax.parallel import distributed
from finercut_jax.parallel.sharding import CAND, shard_state
from finercut_jax.rundir.atomic import atomic_write_json, read_json


class NonFiniteLoss(ValueError):
  """The training loss became NaN or infinite."""


def _sum_loss(model: Llama, tokens, mask):
  """Summed next-token cross entropy of `tokens` `[B, T]` at the `mask`ed positions (float32)."""
  logp = jax.nn.log_softmax(model.logits(model.hidden(tokens[:, :-1])), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask[:, :-1], nll, 0.0))


def _fold_keys(keys, salt):
  """Every dropout key folded with `salt` (a new, reproducible mask per micro-batch)."""
  def fold(k):
    flat = k.reshape(-1, k.shape[-1])
    out = jax.vmap(lambda d: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(d), salt)))(flat)
    return out.reshape(k.shape)
  return jax.tree.map(fold, keys)


class Trainer:
  """The compiled training and held-out steps of one model and method."""

  def __init__(self, model: Llama, c, mesh):
    self.c, self.mesh = c, mesh
    selected, mask_fn = trainable_parts(model, c)
    graphdef, self.keys, trainable, frozen = nnx.split(model, DropoutKey, selected, ...)
    self.graphdef_eval = graphdef
    model.set_attributes(deterministic=False, raise_if_not_found=False)
    self.graphdef_train = nnx.split(model, DropoutKey, selected, ...)[0]
    model.set_attributes(deterministic=True, raise_if_not_found=False)
    cfg = model.config
    self.trainable = shard_state(trainable, mesh, cfg)
    self.frozen = shard_state(frozen, mesh, cfg)
    self.update_mask = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(mask_fn(path, x.shape), jnp.float32), self.trainable)
    self.schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, int(c.warmup_steps), max(int(c.steps), int(c.warmup_steps) + 1),
        end_value=c.end_learning_rate)
    self.tx = optax.chain(
        optax.clip_by_global_norm(c.clip_norm) if c.clip_norm else optax.identity(),
        optax.adamw(self.schedule, weight_decay=c.weight_decay))
    self.batch_sharding = NamedSharding(mesh, P(None, CAND))
    self.num_cand = mesh.shape[CAND]
    if c.micro_batch % self.num_cand:
      raise ValueError(f"heal.micro_batch {c.micro_batch} is not a multiple of the mesh's "
                       f"{self.num_cand} data-parallel devices")
    self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
    self._eval = jax.jit(self._heldout_sum)

  def init_opt_state(self):
    # Scalars (step counts) replicated over the mesh, as the step returns them: else the second
    # step would compile again for the other placement.
    rep = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                        else jax.device_put(x, rep), jax.jit(self.tx.init)(self.trainable))

  def _merge(self, graphdef, trainable, frozen, keys):
    return nnx.merge(graphdef, keys, trainable, frozen)

  def _train_step(self, trainable, opt_state, frozen, keys, step, tokens, mask):
    count = jnp.maximum(jnp.sum(mask[..., :-1]), 1)

    def micro(carry, xs):
      grads, total = carry
      i, tok, m = xs
      salted = _fold_keys(keys, step * tokens.shape[0] + i)
      loss_fn = lambda t: _sum_loss(self._merge(self.graphdef_train, t, frozen, salted), tok, m)
      loss, g = jax.value_and_grad(loss_fn)(trainable)
      return (jax.tree.map(jnp.add, grads, g), total + loss), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.float32(0)),
                                     (jnp.arange(tokens.shape[0]), tokens, mask))
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = self.tx.update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, self.update_mask)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, total / count, optax.global_norm(grads)

  def _heldout_sum(self, trainable, frozen, keys, tokens, mask):
    model = self._merge(self.graphdef_eval, trainable, frozen, keys)
    sums = jax.vmap(lambda t, m: _sum_loss(model, t, m))(tokens, mask)
    return jnp.sum(sums), jnp.sum(mask[..., :-1])

  def put(self, array):
    """array: [A, B, ...] -> on the mesh, its axis 1 (the micro-batch) split over `cand`."""
    return jax.device_put(array, self.batch_sharding)

  def step(self, opt_state, step: int, tokens, mask):
    """One optimizer step over tokens int32 [A, B, T] with mask bool [A, B, T] (A micro-batches
    of B windows); returns (opt_state, mean loss per target token, gradient global norm)."""
    self.trainable, opt_state, loss, norm = self._step(
        self.trainable, opt_state, self.frozen, self.keys, jnp.int32(step), self.put(tokens),
        self.put(mask))
    return opt_state, float(distributed.gather(loss)), float(distributed.gather(norm))

  def heldout_loss(self, tokens, mask) -> float:
    """Mean loss per target token of tokens int [H, T] with mask bool [H, T], over whole
    micro-batches (the rest is left out; NaN when not one micro-batch is there)."""
    mb = int(self.c.micro_batch)
    n = len(tokens) // mb * mb
    if n == 0:
      return float("nan")
    t = tokens[:n].reshape(-1, mb, tokens.shape[-1])
    m = mask[:n].reshape(-1, mb, tokens.shape[-1])
    total, count = self._eval(self.trainable, self.frozen, self.keys, self.put(t), self.put(m))
    return float(distributed.gather(total)) / max(float(distributed.gather(count)), 1.0)

  def model(self) -> Llama:
    """The trained model (deterministic), LoRA merged."""
    return merge_lora(self._merge(self.graphdef_eval, self.trainable, self.frozen, self.keys))


def train(trainer: Trainer, data_: TrainingData, history_path: str, ckpt_dir: str,
          fingerprint: dict, *, log: Callable = print, progress: bool = True) -> dict:
  """Runs (or resumes) the optimizer steps; returns the history. Checkpoints of the training
  state go under `ckpt_dir`, the history (settings and loss curve) to `history_path`."""
  c = trainer.c
  directory = os.path.dirname(history_path)
  stored = distributed.on_primary(lambda: read_json(history_path, None))
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True))
  opt_state = trainer.init_opt_state()
  history = {"fingerprint": fingerprint, "steps": [], "heldout": [], "complete": False}
  start = 0
  latest = manager.latest_step()
  if latest is not None:
    if stored is None or stored.get("fingerprint") != fingerprint:
      raise ValueError(f"{ckpt_dir} holds a healing run with other settings, data or model; "
                       f"use the same settings or delete {directory}")
    target = {"trainable": trainer.trainable, "opt_state": opt_state}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    trainer.trainable, opt_state = restored["trainable"], restored["opt_state"]
    history = stored
    history["steps"] = [s for s in stored["steps"] if s["step"] < latest]
    history["heldout"] = [h for h in stored["heldout"] if h["step"] <= latest]
    history["complete"] = False
    start = latest
    log(f"healing: resuming at step {start} from {ckpt_dir}")

  def save(step):
    manager.save(step, args=ocp.args.StandardSave(
        {"trainable": trainer.trainable, "opt_state": opt_state}), force=True)
    manager.wait_until_finished()
    distributed.on_primary(lambda: atomic_write_json(history_path, history))

  def heldout(step):
    loss = trainer.heldout_loss(data_.heldout, data_.heldout_mask)
    history["heldout"] = [h for h in history["heldout"] if h["step"] != step]
    history["heldout"].append({"step": step, "loss": loss})
    return loss

  if start == 0 and not history["heldout"]:
    heldout(0)
  bar = None
  if progress and distributed.is_primary():
    bar = tqdm(total=int(c.steps), initial=start, desc="healing", unit="step")
  accumulation = int(c.batch_size) // int(c.micro_batch)
  for step in range(start, int(c.steps)):
    index = batch_indices(step, int(c.batch_size), len(data_.tokens), int(c.seed))
    shape = (accumulation, int(c.micro_batch), data_.tokens.shape[-1])
    begin = time.perf_counter()
    opt_state, loss, norm = trainer.step(opt_state, step, data_.tokens[index].reshape(shape),
                                         data_.mask[index].reshape(shape))
    seconds = time.perf_counter() - begin
    if not math.isfinite(loss):
      kept = manager.latest_step()
      raise NonFiniteLoss(
          f"healing step {step}: the training loss is {loss} (NaN/inf); the last good checkpoint "
          f"({'step ' + str(kept) if kept is not None else 'none yet'}) is kept in {ckpt_dir}; "
          f"lower heal.learning_rate (now {c.learning_rate}) or set heal.clip_norm")
    tokens = int(c.batch_size) * data_.tokens.shape[-1]
    history["steps"].append({"step": step, "loss": loss, "grad_norm": norm,
                             "learning_rate": float(trainer.schedule(step)), "seconds": seconds,
                             "tokens_per_second": tokens / seconds})
    done = step + 1
    if done % int(c.eval_every) == 0 or done == int(c.steps):
      heldout(done)
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
      bar.update(1)
    if done % int(c.checkpoint_every) == 0 or done == int(c.steps):
      save(done)
  if bar is not None:
    bar.close()
  history["complete"] = True
  distributed.on_primary(lambda: atomic_write_json(history_path, history))
  return history
