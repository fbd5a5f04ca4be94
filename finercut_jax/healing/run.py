"""Healing: a short fine-tune of a pruned model with optax, LoRA or partial fine-tuning.

`heal_run(run_dir, ratio, heal_config)` trains the pruned model of a search run and writes
`<run_dir>/healed/ratio_<r>/`:
  params/, model.json, tokenizer/   the healed model (LoRA merged), a pruned checkpoint that
                                    `checkpoint.load_pruned(run_dir, r, healed=True)` restores
  train/                            Orbax checkpoints of the training state, every
                                    `checkpoint_every` steps (an interrupted run resumes from the
                                    latest to the identical loss curve)
  healing.json                      settings, data, and the loss curve (train and held-out)
  healing.png                       the loss curve

Methods:
- `lora`: each target projection (`q, k, v, o` of attention, `gate, up, down` of the MLP) becomes
  `LoRALinear`: `base(x) + dropout(x) @ A @ B * alpha / rank` with `A`, `B` `nnx.LoRAParam`s (A
  Kaiming-uniform, B zero, so training starts from the pruned model exactly); only they train.
- `partial`: the LM head (the embedding, when tied) and the last `last_blocks` blocks that still
  hold a sublayer train in full; everything else is frozen.

Training: AdamW with linear warmup and cosine decay, gradient clipping by global norm, gradient
accumulation over micro-batches to the effective batch (a `lax.scan` inside one compiled step).
Parameters stay float32 (the master weights); compute runs in `compute_dtype` (bfloat16 on
accelerators by default). The batch is split over the mesh's `cand` axis (data parallelism) and
the weights over its `model` axis, as in the search. Batches are a pure function of the step, so
a resumed run sees the same data in the same order.

Data: by default the calibration text source, from after the calibration tokens and after the
held-out perplexity text; or a local text file, or an instruction data set in the Alpaca JSON
format (`[{"instruction", "input", "output"}]`, loss on the response only). Training windows that
share any 32-token span with the calibration set or the held-out text are refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from finercut_jax.parallel import distributed
from finercut_jax.rundir.atomic import atomic_write_json, read_json
from finercut_jax.model.modules import Llama

METHODS = ("lora", "partial")
LORA_TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
                "o": ("attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                "down": ("mlp", "down_proj")}
OVERLAP_NGRAM = 32


def default_heal_config() -> ml_collections.ConfigDict:
  """The official code's LoRA settings (rank 8, alpha 32, dropout 0.1 on every projection; AdamW
  lr 3e-4, 100 warmup steps, sequences of 256, effective batch 128)."""
  c = ml_collections.ConfigDict()
  c.enabled = False  # the main job heals `ratio` after the search when set
  c.ratio = 0.25  # which pruned model of the run (a ratio of its masks.json)
  c.method = "lora"  # lora | partial
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 32.0
  c.lora.dropout = 0.1
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.partial = ml_collections.ConfigDict()
  c.partial.lm_head = True  # the LM head (the embedding, when tied)
  c.partial.last_blocks = 2  # the last k blocks that still hold a sublayer
  c.steps = 200  # optimizer steps
  c.batch_size = 128  # sequences per optimizer step (the effective batch)
  c.micro_batch = 8  # sequences per forward/backward pass; divides batch_size
  c.seq_len = 256
  c.learning_rate = 3e-4
  c.warmup_steps = 100
  c.end_learning_rate = 0.0  # where the cosine decay ends
  c.weight_decay = 0.0
  c.clip_norm = 1.0  # 0: no clipping
  c.compute_dtype = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
  c.seed = 0
  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # "": the calibration source (after the calibration and held-out text)
  c.data.format = "text"  # text | alpaca (then source is the JSON file)
  c.checkpoint_every = 50
  c.eval_every = 25  # held-out loss every this many steps (and at the end)
  c.eval_batches = 2  # at most this many micro-batches of held-out windows for that loss
  return c


def resolve_heal_config(heal_config=None) -> ml_collections.ConfigDict:
  """Defaults overridden by whatever fields `heal_config` sets; unknown fields are refused."""
  from finercut_jax.jobs.cli import override_section
  try:
    return override_section(default_heal_config(), heal_config, "heal",
                            "finercut_jax/healing/")
  except KeyError as e:
    raise ValueError(e.args[0]) from None


def check_config(c) -> None:
  """Refuses settings that cannot train, naming the field."""
  if c.method not in METHODS:
    raise ValueError(f"heal.method {c.method!r}: choose one of {', '.join(METHODS)}")
  for name in ("steps", "batch_size", "micro_batch", "seq_len", "checkpoint_every", "eval_every"):
    if int(c[name]) < 1:
      raise ValueError(f"heal.{name} must be >= 1, got {c[name]}")
  if c.seq_len < 2:
    raise ValueError(f"heal.seq_len must be >= 2, got {c.seq_len}")
  if c.batch_size % c.micro_batch:
    raise ValueError(f"heal.batch_size {c.batch_size} is not a multiple of heal.micro_batch "
                     f"{c.micro_batch}")
  if not 0 <= c.warmup_steps < max(c.steps, 1) + 1:
    raise ValueError(f"heal.warmup_steps {c.warmup_steps} must be in [0, heal.steps]")
  if not c.learning_rate > 0:
    raise ValueError(f"heal.learning_rate must be > 0, got {c.learning_rate}")
  if c.method == "lora":
    if c.lora.rank < 1 or not 0 <= c.lora.dropout < 1:
      raise ValueError(f"heal.lora.rank must be >= 1 and heal.lora.dropout in [0, 1), got "
                       f"{c.lora.rank}, {c.lora.dropout}")
    unknown = [t for t in _targets(c) if t not in LORA_TARGETS]
    if unknown or not _targets(c):
      raise ValueError(f"heal.lora.targets {c.lora.targets!r}: choose from "
                       f"{', '.join(LORA_TARGETS)}")
  if c.data.format not in ("text", "alpaca"):
    raise ValueError(f"heal.data.format {c.data.format!r}: choose text or alpaca")


def _targets(c) -> list[str]:
  return [t.strip() for t in str(c.lora.targets).split(",") if t.strip()]


# ----------------------------------------------------------------------------- LoRA


class DropoutKey(nnx.Variable):
  """A LoRA's dropout key (raw key data): set per micro-batch by the trainer, never trained."""


class LoRALinear(nnx.Module):
  """`base(x) + dropout(x) @ lora_a @ lora_b * alpha / rank` (the PEFT LoRA layer)."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float, *,
               rngs: nnx.Rngs):
    self.base = base
    init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PEFT's Kaiming
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (base.in_features, rank), jnp.float32))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), jnp.float32))
    self.scale = float(alpha) / rank
    self.rate = float(dropout)
    self.deterministic = True
    self.dropout_key = DropoutKey(jax.random.key_data(rngs.dropout()))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    h = x
    if self.rate and not self.deterministic:
      key = jax.random.wrap_key_data(self.dropout_key[...])
      keep = jax.random.bernoulli(key, 1 - self.rate, x.shape)
      h = jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)
    a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
    return y + ((h @ a) @ b * self.scale).astype(y.dtype)


def add_lora(model: Llama, *, rank: int, alpha: float, dropout: float,
             targets=tuple(LORA_TARGETS), seed: int = 0) -> Llama:
  """Wraps the target projections of every kept sublayer in `LoRALinear`, in place."""
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  experts = [t for t in targets if model.config.is_moe and LORA_TARGETS[t][0] == "mlp"]
  if experts:
    raise ValueError(f"heal.lora.targets {','.join(experts)}: LoRA on a mixture's experts is not "
                     f"implemented; set --config.heal.lora.targets=q,k,v,o (attention) or "
                     f"--config.heal.method=partial")
  for target in targets:
    kind, name = LORA_TARGETS[target]
    stack = getattr(model.layers, kind)
    n = getattr(stack, name).kernel.shape[0]
    if n == 0:
      continue

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def wrap(base, rngs):
      return LoRALinear(base, rank, alpha, dropout, rngs=rngs)

    setattr(stack, name, wrap(getattr(stack, name), rngs))
  return model


def merge_lora(model: Llama) -> Llama:
  """Folds every `LoRALinear` into its base kernel (`W + A @ B * alpha / rank`), in place."""
  for kind in ("attn", "mlp"):
    stack = getattr(model.layers, kind)
    for _, name in [v for v in LORA_TARGETS.values() if v[0] == kind]:
      lora = getattr(stack, name, None)  # (a mixture's FFN has no such projection)
      if isinstance(lora, LoRALinear):
        kernel = lora.base.kernel
        delta = jnp.einsum("nir,nro->nio", lora.lora_a[...], lora.lora_b[...]) * lora.scale
        kernel.set_value((kernel[...].astype(jnp.float32) + delta).astype(kernel.dtype))
        setattr(stack, name, lora.base)
  return model


# ----------------------------------------------------------------------------- what trains


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_parts(model: Llama, c):
  """(nnx filter of the trained variables, update mask per trained leaf as a function of its
  path and shape). LoRA: the `LoRAParam`s, whole. Partial: the LM head and the stacked rows of
  the last blocks."""
  if c.method == "lora":
    return nnx.LoRAParam, lambda path, shape: 1.0
  head = "lm_head" if model.lm_head is not None else "embed"
  present = model.present
  holding = np.flatnonzero(present.any(axis=1))
  chosen = set(holding[-int(c.partial.last_blocks):].tolist()) if c.partial.last_blocks else set()
  rows = {}
  for kind, column in (("attn", 0), ("mlp", 1)):
    layers = np.flatnonzero(present[:, column])  # the stack's rows, by block
    rows[kind] = np.asarray([layer in chosen for layer in layers], np.float32)

  def selected(path, value):
    p = _path_str(path)
    if not isinstance(value, nnx.Param):
      return False
    if p.startswith(head + "/"):
      return bool(c.partial.lm_head)
    return any(p.startswith(f"layers/{k}/") and rows[k].any() for k in rows)

  def mask(path, shape):
    p = _path_str(path)
    for kind, r in rows.items():
      if p.startswith(f"layers/{kind}/"):
        return r.reshape((-1,) + (1,) * (len(shape) - 1))
    return 1.0

  if not (c.partial.lm_head or any(r.any() for r in rows.values())):
    raise ValueError("heal.method=partial with heal.partial.lm_head=False and last_blocks=0 "
                     "trains nothing")
  return selected, mask


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class TrainingData:
  """Windows `[W, T]` of token ids, the positions whose next token is a target `[W, T]`, and
  held-out windows for the held-out loss."""
  tokens: np.ndarray
  mask: np.ndarray
  heldout: np.ndarray
  heldout_mask: np.ndarray
  info: dict


def _ngrams(tokens: np.ndarray, n: int) -> set[bytes]:
  """Every n-token span of a 1-D array, as bytes."""
  tokens = np.ascontiguousarray(np.asarray(tokens, np.int64).reshape(-1))
  if len(tokens) < n:
    return {tokens.tobytes()} if len(tokens) else set()
  view = np.lib.stride_tricks.sliding_window_view(tokens, n)
  return {row.tobytes() for row in view}


def check_no_overlap(train: np.ndarray, train_mask: np.ndarray, protected: dict) -> None:
  """Refuses training windows that share a 32-token span with a protected text (the calibration
  set, the held-out perplexity text)."""
  seen = set()
  for w, m in zip(train, train_mask):
    seen |= _ngrams(w, OVERLAP_NGRAM) if m.any() else set()
  for name, tokens in protected.items():
    spans = set().union(*(_ngrams(row, OVERLAP_NGRAM) for row in np.atleast_2d(tokens)))
    if seen & spans:
      raise ValueError(f"the healing data shares {len(seen & spans)} spans of {OVERLAP_NGRAM} "
                       f"tokens with the {name}: healing on it would leak into what is measured; "
                       f"choose another heal.data.source")


def _alpaca_windows(tokenizer, path: str, seq_len: int):
  from finercut_jax.evaluation.lm import encode
  try:
    with open(path) as f:
      records = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read an Alpaca JSON data set ({e})") from None
  if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r
                                              and "output" in r for r in records):
    raise ValueError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
  tokens = np.zeros((len(records), seq_len), np.int32)
  mask = np.zeros((len(records), seq_len), bool)
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  for i, r in enumerate(records):
    head = ("Below is an instruction that describes a task" +
            (", paired with an input that provides further context" if r.get("input") else "") +
            ". Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{r['instruction']}\n\n" +
            (f"### Input:\n{r['input']}\n\n" if r.get("input") else "") + "### Response:\n")
    prompt = encode(tokenizer, head)
    response = encode(tokenizer, r["output"], add_special_tokens=False) + eos
    ids = (prompt + response)[:seq_len]
    tokens[i, :len(ids)] = ids
    # Position j predicts token j+1: targets are the response tokens.
    mask[i, max(len(prompt) - 1, 0):len(ids) - 1] = True
  keep = mask.any(axis=1)
  return tokens[keep], mask[keep]


def training_data(tokenizer, c, run_config: dict, calibration: np.ndarray,
                  heldout_tokens: np.ndarray, heldout_source: str,
                  heldout_offset: int) -> TrainingData:
  """The healing windows, checked against the run's calibration set `[N, T]` (the first N*T
  tokens of its source) and the held-out text."""
  from finercut_jax import data
  T = int(c.seq_len)
  calib_source = run_config.get("data", {}).get("source", "packaged")
  n_calib = int(calibration.size)
  source = c.data.source or calib_source
  heldout_windows = heldout_tokens[:len(heldout_tokens) // T * T].reshape(-1, T)
  if c.data.format == "alpaca":
    tokens, mask = _alpaca_windows(tokenizer, source, T)
    start = 0
  else:
    stream = data.token_stream(tokenizer, source)
    # Skip what the calibration set and the held-out text use of the same source.
    start = max([n_calib if source == calib_source else 0] +
                [heldout_offset + len(heldout_tokens)] * (source == heldout_source))
    rest = np.asarray(stream[start:], np.int32)
    count = len(rest) // T
    tokens = rest[:count * T].reshape(count, T)
    mask = np.ones_like(tokens, bool)
    mask[:, -1] = False  # the last position has no next token in its window
  need = int(c.micro_batch)
  if len(tokens) < need:
    raise ValueError(f"heal.data.source {source!r} gives {len(tokens)} training windows of "
                     f"{T} tokens (after skipping the first {start} tokens: calibration and "
                     f"held-out text); need at least heal.micro_batch={need}")
  check_no_overlap(tokens, mask, {"calibration set": calibration,
                                  "held-out perplexity text": heldout_tokens})
  h = heldout_windows[:int(c.eval_batches) * need]
  info = {"source": source, "format": c.data.format, "skipped_tokens": int(start),
          "windows": int(len(tokens)), "seq_len": T,
          "target_tokens": int(mask.sum()), "heldout_windows": int(len(h))}
  return TrainingData(tokens, mask, h, np.pad(np.ones_like(h, bool)[:, 1:], ((0, 0), (0, 1))),
                      info)


def batch_indices(step: int, batch_size: int, num_windows: int, seed: int) -> np.ndarray:
  """Window indices of optimizer step `step`: epochs of seeded permutations, a pure function of
  the step (a resumed run reads the same batches)."""
  first = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(first + len(out), num_windows)
    order = np.random.default_rng([seed, epoch]).permutation(num_windows)
    out.extend(order[offset:offset + batch_size - len(out)].tolist())
  return np.asarray(out)


# ----------------------------------------------------------------------------- training


class NonFiniteLoss(ValueError):
  """The training loss became NaN or infinite."""


def _compute_dtype(c):
  if c.compute_dtype != "auto":
    return jnp.dtype(c.compute_dtype)
  return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


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
    from finercut_jax.parallel.sharding import CAND, shard_state
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
    return jax.device_put(array, self.batch_sharding)

  def step(self, opt_state, step: int, tokens, mask):
    self.trainable, opt_state, loss, norm = self._step(
        self.trainable, opt_state, self.frozen, self.keys, jnp.int32(step), self.put(tokens),
        self.put(mask))
    return opt_state, float(distributed.gather(loss)), float(distributed.gather(norm))

  def heldout_loss(self, tokens, mask) -> float:
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


def _fingerprint(c, data_info: dict, source_meta: dict) -> dict:
  settings = json.loads(c.to_json())
  settings.pop("enabled", None)
  settings.pop("checkpoint_every", None)
  settings.pop("eval_every", None)
  return {"settings": settings, "data": data_info, "model": source_meta}


def train(trainer: Trainer, data_: TrainingData, directory: str, fingerprint: dict, *,
          log: Callable = print, progress: bool = True) -> dict:
  """Runs (or resumes) the optimizer steps; returns the history. Checkpoints go under
  `directory/train`, the history to `directory/healing.json`."""
  import orbax.checkpoint as ocp
  c = trainer.c
  history_path = os.path.join(directory, "healing.json")
  ckpt_dir = os.path.join(os.path.abspath(directory), "train")
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
    from tqdm import tqdm
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


# ----------------------------------------------------------------------------- a run


def healed_dir(run_dir: str, ratio: float) -> str:
  from finercut_jax.model.checkpoint import ratio_name
  return os.path.join(run_dir, "healed", ratio_name(ratio))


def heal_run(run_dir: str, ratio: float, heal_config=None, *, mesh=None, log=print,
             progress: bool = True) -> str:
  """Heals the pruned model of `run_dir` at `ratio`; returns the healed checkpoint directory.
  Every process of a multi-process job calls it."""
  from finercut_jax.model import checkpoint
  from finercut_jax.evaluation.run import heldout_for_run, resolve_eval_config
  from finercut_jax.parallel.sharding import make_mesh
  c = resolve_heal_config(heal_config)
  check_config(c)
  run_config = distributed.on_primary(lambda: read_json(os.path.join(run_dir, "config.json")))
  if run_config is None:
    raise FileNotFoundError(f"{run_dir}/config.json is missing: not a run directory")
  if mesh is None:  # the search's mesh: the batch over its `cand` axis, weights over `model`
    scorer = run_config.get("scorer", {})
    mesh = make_mesh(cand=int(scorer.get("mesh_cand", 0)) or None,
                     model=int(scorer.get("mesh_model", 1)))
  dtype = _compute_dtype(c)
  model, tokenizer = checkpoint.load_pruned(run_dir, ratio, dtype=jnp.float32)
  if tokenizer is None:
    from finercut_jax.model.loading import load_tokenizer
    tokenizer = load_tokenizer(run_config["model"]["path"])
  params = model.params()
  model = Llama.from_params(model.config, params, present=model.present, dtype=dtype)
  eval_config = resolve_eval_config(run_config.get("eval"))
  eval_config.perplexity.seq_len = int(c.seq_len)
  # At least one micro-batch of held-out windows (the training text starts after all of it).
  eval_config.perplexity.num_tokens = max(int(eval_config.perplexity.num_tokens),
                                          int(c.micro_batch) * int(c.seq_len))
  heldout, info = heldout_for_run(run_config, tokenizer, eval_config, run_dir)
  calibration = np.asarray(distributed.on_primary(
      lambda: np.load(os.path.join(run_dir, "calibration_tokens.npy")).tolist()), np.int32)
  data_ = training_data(tokenizer, c, run_config, calibration, heldout, info["source"],
                        info["offset"])
  directory = healed_dir(run_dir, ratio)
  pruned_meta = read_json(os.path.join(checkpoint.pruned_dir(run_dir, ratio), "model.json"))
  fingerprint = _fingerprint(c, data_.info, {"keep": pruned_meta["keep"],
                                             "dtype": pruned_meta["dtype"], "ratio": ratio})
  if c.method == "lora":
    add_lora(model, rank=int(c.lora.rank), alpha=float(c.lora.alpha),
             dropout=float(c.lora.dropout), targets=_targets(c), seed=int(c.seed))
  log(f"healing {run_dir} at ratio {ratio:g}: {c.method}, {c.steps} steps of "
      f"{c.batch_size} x {c.seq_len} tokens on {data_.info['windows']} windows of "
      f"{data_.info['source']}")
  trainer = Trainer(model, c, mesh)
  history = train(trainer, data_, directory, fingerprint, log=log, progress=progress)
  healed = trainer.model()
  final = Llama.from_params(healed.config, jax.tree.map(
      lambda x: x.astype(pruned_meta["dtype"]), healed.params()), present=healed.present)
  checkpoint.save_model(directory, final, tokenizer=tokenizer,
                        source=f"{run_dir} ratio {ratio:g}, healed ({c.method})",
                        extra={"healing": fingerprint})

  def plot():
    from finercut_jax.evaluation.plots import plot_healing
    plot_healing(history, os.path.join(directory, "healing.png"))
  distributed.on_primary(plot)
  first, last = history["heldout"][0]["loss"], history["heldout"][-1]["loss"]
  log(f"healed: held-out loss {first:.4f} -> {last:.4f}; wrote {directory}")
  return directory
