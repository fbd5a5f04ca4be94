r"""Device check: one prepared run that says whether this project works, and how fast, on the
accelerator at hand (a GPU or a TPU), inside the JAX environment that is already there.

    python -m benchmarks.device_check                 # on a GPU or TPU: at most --budget_s (480)
    python -m benchmarks.device_check --tiny          # anywhere, tiny shapes (a CPU: ~30-60 s)
    bash launch/device_check.sh                       # install without touching JAX, then run

What it does, in order, and writes to one JSON (`--out`, default
`benchmarks/results/device_check_<device kind>.json`), ending with one summary line on stdout:

1. **Environment**: Python, JAX, jaxlib, the accelerator plugin (jax-cuda*-plugin / libtpu), Flax,
   Orbax, transformers, torch; JAX's backend, the device kind (read, never assumed), the device
   count and memory; which of the project's declared requirements this environment does not meet
   (installed with `--no-deps`, nothing checked them).
2. **Correctness on the accelerator**: the logits of tiny random checkpoints of every family
   (llama, mistral, qwen2, mixtral) against transformers' PyTorch model on the same device (torch's
   CUDA device; on a TPU torch runs on the host), float32 and bfloat16, each dense and with keep
   masks; and a short greedy search by the compiled scorer against the plain reference loop (one
   full forward per candidate, float64 divergence on the host), which must pick the same sublayers.
3. **The scorer at the size users prune**: a Llama-3-8B-shaped model with random bfloat16 weights
   (`--tiny`: 6 layers of width 64), the paper's 10 x 256 calibration tokens (random ids), 3
   greedy steps of `js_official`, against the official PyTorch loop
   (`official_baseline.official_greedy`) on the same device in the same run: the same picks, the
   time ratio, and the scorer's FLOP rate as a fraction of the chip's bfloat16 matmul rate
   measured in the same process.
4. **Prefill and decode throughput** of the dense and a 25%-pruned model of that shape
   (`evaluation.throughput.measure`), and the peak device memory of each phase.
5. The JSON, and a summary line starting `device_check:`.

Budget. `--budget_s` (480) bounds the whole run: a part that cannot start in the time left is
skipped and named in the JSON, and the official loop (last, being the slowest: every candidate is
N batch-1 forwards of the full model with the logits moved to the host and the divergence computed
there, as the official code does) runs as many of the 3 steps as its measured per-candidate time
fits into what is left (its estimate for all 3 is recorded). The JSON is written in every case.

Processes. Without `--tiny` each part runs in a fresh interpreter (`--isolate`): torch and JAX
never share the device in the timed parts, and JAX's `peak_bytes_in_use`, which cannot be reset,
is each process's own. Within the JAX process the phases run from the smallest to the largest
footprint (pruned throughput, dense throughput, scorer), so each phase's peak is its own whenever
it rises above the one before (`own_peak`). With `--tiny` the parts run in this process (one
interpreter start instead of four: that is what keeps the CPU run short); on a CPU there are no
device-memory statistics and the memory figures are null.

Tolerances (why they are what they are). float32 logits: absolute 1e-4 on logits of order one
(the random tiny models' logits reach |3|), with JAX's matmul precision "highest" and torch's TF32
off for these comparisons, so that neither side rounds its float32 matmuls to TF32/bfloat16;
measured differences on a CPU are ~1e-6. bfloat16 logits have no exact answer to compare with:
each side rounds differently, so ours is compared with the float32 reference and must be at most
`BF16_FACTOR` times as far from it (RMS over all logits) as transformers' own bfloat16 model is,
plus `BF16_FLOOR`: "no worse than transformers' bfloat16", measured in the same run (on a CPU
ours was 0.5-1.14x transformers'). RMS, not the maximum: in bfloat16 a Mixtral token's expert
choice can flip, on either side, which moves that token's logits by ~1 (measured). Greedy
scores: relative 1e-4 against the float64 reference (the tests hold 1e-5 on a CPU; a GPU's
reduction order differs), picks exactly.

The 8B-shaped model's weights are random (std 0.02, the Hugging Face initializer) except that the
attention output projections of three blocks in the back half are scaled by 0.1, 0.2 and 0.4: so
the first three greedy picks have clear margins over every other candidate in bfloat16 (with
untouched random weights, sublayers of one kind in neighbouring blocks can differ by a few
percent, near bfloat16's rounding, and two correct implementations could pick differently). A
mid-size model built this way (hidden 1024, 8 blocks, vocab 32000) picked the planted sublayers on
both sides, each runner-up 2.4-5.3x the pick's score; in the 6-block tiny model FFN removals
compete with them. The planted blocks are recorded; the check is that both sides pick alike.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
from packaging.requirements import Requirement

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# After the path above (run as a script, this file's directory is on sys.path, not the
# repository). JAX, torch and finercut_jax are imported inside the parts that use them: each
# isolated part's process imports only what it needs, and the driver starts no JAX backend (on a
# GPU that would hold device memory while the parts run).
from benchmarks.machine import cpu_name  # noqa: E402

GIB = 2 ** 30
SUMMARY_PREFIX = "device_check:"
F32_ATOL = 1e-4
BF16_FACTOR = 2.0
BF16_FLOOR = 1e-3
GREEDY_RTOL = 1e-4
PLANTED_SCALES = (0.1, 0.2, 0.4)
PRUNE_RATIO = 0.25

# Llama-3-8B's published architecture (config.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})

MODES = {
    # One H200 (141 GB): the paper's calibration size, chunks of 8 candidates as the paper configs
    # use on accelerators, kept candidate states at every 2nd sublayer boundary for all 64 slots
    # (32 levels x 64 x 10 x 256 x 4096 bfloat16 = 40 GiB, beside 15 GiB of weights).
    "full": dict(model=LLAMA3_8B, num_sequences=10, seq_len=256, steps=3, chunk_width=8,
                 position_block=256, state_memory_gb=40.0, matmul_size=8192, matmul_repeats=10,
                 throughput=dict(batch_size=8, prompt_len=512, decode_steps=128, repeats=3),
                 greedy_chunk_width=4),
    "tiny": dict(model=TINY_LLAMA, num_sequences=2, seq_len=16, steps=3, chunk_width=1,
                 position_block=16, state_memory_gb=0.25, matmul_size=256, matmul_repeats=5,
                 throughput=dict(batch_size=2, prompt_len=16, decode_steps=8, repeats=2),
                 greedy_chunk_width=1),
}
# What each part needs at least (seconds) before it is started at all.
MIN_SECONDS = {"full": {"checkpoint": 60, "jax": 90, "official": 45},
               "tiny": {"checkpoint": 2, "jax": 5, "official": 2}}

# Tiny random checkpoints of every family, each with the part that sets it apart from Llama made to
# matter (as tests/hf_tiny.py): Llama-3.1 rope scaling and a head_dim that is not hidden/heads; a
# sliding window far shorter than the sequence; q/k/v biases, tied embeddings, Qwen2.5's theta;
# top-2 of 4 experts.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        max_position_embeddings=256)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
        tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False)),
}
PARITY_BATCH, PARITY_SEQ = 2, 40


class _OutOfTime(Exception):
  """Raised from the search's step callback when the part's deadline has passed."""


# ============================================================================== small helpers


def _now() -> float:
  return time.time()


def _versions() -> dict:
  """Installed versions of what the run depends on (None where absent), and every JAX
  accelerator plugin installed (jax-cuda*/jax-rocm*/libtpu distributions)."""
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
               "huggingface-hub", "safetensors", "torch", "accelerate", "numpy", "finercut_jax"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  plugins = {}
  for dist in md.distributions():
    name = (dist.metadata["Name"] or "").lower().replace("_", "-")
    if name.startswith(("jax-cuda", "jax-rocm", "libtpu")):
      plugins[name] = dist.version
  out["accelerator_plugins"] = dict(sorted(plugins.items()))
  return out


def unmet_requirements() -> list[str] | None:
  """The project's declared requirements (no extras) that the installed versions do not meet;
  None if the project is not installed (run from a plain checkout)."""
  try:
    declared = md.requires("finercut_jax") or []
  except md.PackageNotFoundError:
    return None
  unmet = []
  for line in declared:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
      continue
    try:
      have = md.version(req.name)
    except md.PackageNotFoundError:
      unmet.append(f"{req} (not installed)")
      continue
    if not req.specifier.contains(have, prereleases=True):
      unmet.append(f"{req} (installed {have})")
  return unmet


def device_memory(device=None) -> dict | None:
  """`bytes_in_use`, `peak_bytes_in_use` and `bytes_limit` of a JAX device (GPU and TPU report
  them); None where the backend keeps no statistics (the CPU)."""
  # lazy: JAX, in the processes of the JAX parts only
  import jax
  device = device or jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
          if k in stats}


def _phase_memory(before: dict | None, after: dict | None) -> dict | None:
  """A phase's device memory: the cumulative peak after it, and whether the peak rose during it
  (then it is the phase's own peak; else the phase stayed below an earlier phase's peak)."""
  if after is None:
    return None
  rose = before is None or after["peak_bytes_in_use"] > before["peak_bytes_in_use"]
  return {"peak_bytes": after["peak_bytes_in_use"], "own_peak": bool(rose),
          "bytes_in_use_before": None if before is None else before["bytes_in_use"],
          "bytes_in_use_after": after["bytes_in_use"], "bytes_limit": after.get("bytes_limit")}


def torch_device() -> str:
  """torch's device for the comparisons: CUDA where torch sees a GPU, else the CPU."""
  # lazy: torch, in the torch parts only
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def margin(scores: dict, exclude=()) -> float | None:
  """How far a step's pick is from a tie: (second-best - best) / best over the complete scores
  (`exclude`: candidates whose score is only a lower bound)."""
  values = sorted(v for k, v in scores.items() if int(k) not in set(exclude))
  if len(values) < 2:
    return None
  return (values[1] - values[0]) / max(abs(values[0]), 1e-30)


def _rms(x) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def js64(dense: np.ndarray, pruned: np.ndarray) -> float:
  """Textbook Jensen-Shannon divergence 0.5 KL(P||M) + 0.5 KL(Q||M), summed over the vocabulary,
  mean over positions, in float64 from the definition (the scorer's `js` metric)."""
  lp = _log_softmax64(np.asarray(dense, np.float64))
  lq = _log_softmax64(np.asarray(pruned, np.float64))
  lm = np.log(0.5 * (np.exp(lp) + np.exp(lq)))
  kl_pm = np.sum(np.exp(lp) * (lp - lm), axis=-1)
  kl_qm = np.sum(np.exp(lq) * (lq - lm), axis=-1)
  return float(np.mean(0.5 * kl_pm + 0.5 * kl_qm))


def prune_mask(num_layers: int, ratio: float = PRUNE_RATIO) -> np.ndarray:
  """A keep mask `[L, 2]` without `int(ratio * 2L)` sublayers in FinerCut's usual shape: a quarter
  of them FFNs (blocks just before the last four), the rest attention (the last blocks); the
  README's SmolLM2 run removed 12 attention and 3 FFN sublayers at 25%. Throughput depends only
  on how many of each kind are gone."""
  n = int(ratio * 2 * num_layers)
  n_ffn = n // 4
  keep = np.ones((num_layers, 2), bool)
  keep[num_layers - (n - n_ffn):, 0] = False
  start = max(num_layers - 4 - n_ffn, 0)
  keep[start:start + n_ffn, 1] = False
  return keep


def planted_blocks(num_layers: int, seed: int = 0) -> list[int]:
  """The back-half blocks whose attention output projections get `PLANTED_SCALES`, in that
  order (so the expected first picks are their attention sublayers, in this order)."""
  rng = np.random.default_rng(seed)
  back = np.arange(num_layers // 2, num_layers)
  return [int(b) for b in rng.choice(back, size=len(PLANTED_SCALES), replace=False)]


# ============================================================================== part: parity


def make_family_checkpoint(family: str, directory: str, seed: int = 1) -> str:
  """A tiny random transformers model of `family`, saved as a float32 Hugging Face checkpoint.
  initializer_range 0.1 makes the logits O(1) (a 1e-4 tolerance is then a relative test); norms
  are 1 + 0.1 * normal and biases 0.1 * normal, so that one not applied shows."""
  # lazy: torch and transformers, in the parity part only
  import torch
  import transformers
  config_class, model_class, overrides = FAMILIES[family]
  kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                rms_norm_eps=1e-5, max_position_embeddings=128, initializer_range=0.1)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def hf_logits(model, tokens: np.ndarray, keep=None) -> np.ndarray:
  """transformers' float32 logits (on the host) of `tokens`; sublayers with keep False have
  their module's output zeroed by forward hooks (the attention's output, the MLP's or MoE's)."""
  # lazy: torch, in the torch parts only
  import torch

  def zero_first(module, args, out):
    if isinstance(out, tuple):
      return (torch.zeros_like(out[0]),) + tuple(out[1:])
    return torch.zeros_like(out)

  handles = []
  if keep is not None:
    for layer, block in enumerate(model.model.layers):
      ffn = block.mlp if hasattr(block, "mlp") else block.block_sparse_moe
      for kind, module in ((0, block.self_attn), (1, ffn)):
        if not keep[layer][kind]:
          handles.append(module.register_forward_hook(zero_first))
  device = next(model.parameters()).device
  try:
    with torch.no_grad():
      return model(torch.as_tensor(tokens, device=device)).logits.float().cpu().numpy()
  finally:
    for h in handles:
      h.remove()


def parity_masks(num_layers: int) -> dict[str, np.ndarray]:
  """The keep masks each family is compared with: dense, a random one, no attention at all."""
  rng = np.random.RandomState(7)
  random = rng.rand(num_layers, 2) < 0.5
  random[0, 1] = True  # never empty
  no_attn = np.ones((num_layers, 2), bool)
  no_attn[:, 0] = False
  return {"dense": np.ones((num_layers, 2), bool), "random": random, "no_attention": no_attn}


def logits_parity(workdir: str) -> list[dict]:
  """Every family, float32 and bfloat16, every mask: our logits against transformers'."""
  # lazy: the frameworks, in the parity part only
  import jax
  import jax.numpy as jnp
  import torch
  from transformers import AutoModelForCausalLM

  from finercut_jax import load_model
  device = torch_device()
  rows = []
  for family in FAMILIES:
    path = make_family_checkpoint(family, os.path.join(workdir, f"parity_{family}"))
    refs = {dt: AutoModelForCausalLM.from_pretrained(
        path, dtype=dt, attn_implementation="eager", local_files_only=True).to(device).eval()
        for dt in (torch.float32, torch.bfloat16)}
    vocab = refs[torch.float32].config.vocab_size
    tokens = np.random.RandomState(0).randint(0, vocab, (PARITY_BATCH, PARITY_SEQ))
    ours = {name: load_model(path, dt, tokenizer=False)[0]
            for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
    num_layers = ours["float32"].config.num_layers
    for mask_name, keep in parity_masks(num_layers).items():
      want = hf_logits(refs[torch.float32], tokens, keep)
      theirs16 = hf_logits(refs[torch.bfloat16], tokens, keep)
      for dtype, model in ours.items():
        got = np.asarray(jax.device_get(model(jnp.asarray(tokens), jnp.asarray(keep))),
                         np.float32)
        row = {"family": family, "dtype": dtype, "mask": mask_name,
               "reference_max_abs": float(np.abs(want).max()),
               "max_abs_err": float(np.abs(got - want).max()), "rms_err": _rms(got - want)}
        if dtype == "float32":
          row["tolerance"] = F32_ATOL
          row["pass"] = bool(row["max_abs_err"] <= F32_ATOL and row["reference_max_abs"] > 1.0)
        else:
          row["torch_bf16_rms_err"] = _rms(theirs16 - want)
          row["torch_bf16_max_abs_err"] = float(np.abs(theirs16 - want).max())
          row["vs_torch_bf16_max_abs"] = float(np.abs(got - theirs16).max())
          row["tolerance"] = BF16_FACTOR * row["torch_bf16_rms_err"] + BF16_FLOOR
          row["pass"] = bool(row["rms_err"] <= row["tolerance"])
        rows.append(row)
    del refs, ours
  return rows


def greedy_parity(chunk_width: int, steps: int = 4) -> dict:
  """A short greedy search by the compiled scorer against the plain loop: every remaining
  candidate scored by a full forward with its keep mask, float64 divergence on the host, argmin
  (ties: the lowest sublayer id). The tiny model has weights of std 0.3, so that every sublayer
  matters and the steps have clear winners (their margins are reported)."""
  # lazy: JAX and the project, in the parity part only
  import jax
  import jax.numpy as jnp

  from finercut_jax import Llama, LlamaConfig, Scorer, SearchSpec, forward, greedy_search
  from finercut_jax.model.modules import param_shapes
  cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=6,
                    num_heads=8, num_kv_heads=4, head_dim=4, rope_theta=10000.0,
                    tie_embeddings=False)
  rng = np.random.default_rng(0)

  def draw(path, shape):
    scale = (1 + 0.1 * rng.standard_normal(shape)) if "norm" in jax.tree_util.keystr(path) else (
        0.3 * rng.standard_normal(shape))
    return jnp.asarray(scale, jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, param_shapes(cfg),
                                            is_leaf=lambda x: isinstance(x, tuple))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  fwd = jax.jit(forward, static_argnums=1)

  def logits(keep):
    out = fwd(params, cfg, jnp.asarray(tokens), jnp.asarray(keep))
    return np.asarray(out, np.float64).reshape(-1, cfg.vocab_size)

  dense = logits(np.ones((cfg.num_layers, 2), bool))
  keep = np.ones((cfg.num_layers, 2), bool)
  want_picks, want_scores, margins, all_scores = [], [], [], []
  for _ in range(steps):
    remaining = [s for s in range(2 * cfg.num_layers) if keep.reshape(-1)[s]]
    scores = {}
    for s in remaining:
      trial = keep.copy().reshape(-1)
      trial[s] = False
      scores[s] = js64(dense, logits(trial.reshape(-1, 2)))
    order = sorted(remaining, key=lambda s: (scores[s], s))
    margins.append((scores[order[1]] - scores[order[0]]) / max(abs(scores[order[0]]), 1e-30))
    want_picks.append(order[0])
    want_scores.append(scores[order[0]])
    all_scores.append(scores)
    keep.reshape(-1)[order[0]] = False

  scorer = Scorer(Llama.from_params(cfg, params), tokens, metric="js", chunk_width=chunk_width,
                  position_block=4, max_candidates=2 * cfg.num_layers)
  records = greedy_search(scorer, SearchSpec(num_layers=cfg.num_layers, num_steps=steps))
  got_picks = [r.sublayer for r in records]
  worst = 0.0
  for r, want in zip(records, all_scores):
    bounds = set(r.lower_bounds or ())
    for key, value in (r.scores or {}).items():
      s = int(key)
      if s not in bounds:
        worst = max(worst, abs(value - want[s]) / max(abs(want[s]), 1e-30))
  return {"steps": steps, "chunk_width": chunk_width, "reference_picks": want_picks,
          "scorer_picks": got_picks, "reference_scores": want_scores,
          "scorer_scores": [r.score for r in records], "reference_margins": margins,
          "max_rel_score_diff": worst, "tolerance": GREEDY_RTOL,
          "picks_equal": got_picks == want_picks,
          "pass": bool(got_picks == want_picks and worst <= GREEDY_RTOL)}


def environment() -> dict:
  """What runs here: versions, JAX's backend and devices, torch's device, the host."""
  # lazy: the frameworks, in the parity part only
  import jax
  import torch
  devices = jax.devices()
  env = {"python": platform.python_version(), "platform": platform.platform(),
         "cpu": cpu_name(), "cpu_count": os.cpu_count(), "versions": _versions(),
         "unmet_requirements": unmet_requirements(),
         "jax_backend": jax.default_backend(), "device_kind": devices[0].device_kind,
         "device_platform": devices[0].platform, "device_count": len(devices),
         "process_count": jax.process_count(), "device_memory": device_memory(devices[0]),
         "torch_device": torch_device(), "torch_cuda": torch.version.cuda}
  if env["torch_device"] == "cuda":
    props = torch.cuda.get_device_properties(0)
    env["torch_device_name"] = props.name
    env["torch_device_memory_bytes"] = int(props.total_memory)
  return env


def part_parity(spec: dict) -> dict:
  """Environment, logits parity of every family and dtype, and the greedy search's picks."""
  # lazy: the frameworks, in the parity part only
  import jax
  import torch
  out = {"environment": environment()}
  saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    with jax.default_matmul_precision("highest"):
      t0 = time.perf_counter()
      out["logits"] = logits_parity(spec["workdir"])
      out["logits_seconds"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      out["greedy"] = greedy_parity(spec["greedy_chunk_width"])
      out["greedy_seconds"] = time.perf_counter() - t0
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
  out["pass"] = bool(all(r["pass"] for r in out["logits"]) and out["greedy"]["pass"])
  return out


# ============================================================================== part: checkpoint


def part_checkpoint(spec: dict) -> dict:
  """Writes the random Llama checkpoint (bfloat16 safetensors and config.json) that both sides
  of parts 3 and 4 load; the weights are drawn on torch's device (fast for 8B parameters)."""
  # lazy: torch and transformers, in the checkpoint part only
  import torch
  from safetensors.torch import save_file
  from transformers import LlamaConfig
  t0 = time.perf_counter()
  arch = dict(spec["model"])
  path = os.path.join(spec["workdir"], "model")
  os.makedirs(path, exist_ok=True)
  LlamaConfig(**arch, dtype="bfloat16").save_pretrained(path)
  device = torch_device()
  gen = torch.Generator(device=device).manual_seed(0)
  L, D, F, V = (arch["num_hidden_layers"], arch["hidden_size"], arch["intermediate_size"],
                arch["vocab_size"])
  q = arch["num_attention_heads"] * arch["head_dim"]
  kv = arch["num_key_value_heads"] * arch["head_dim"]
  planted = planted_blocks(L)
  scale_of = {b: s for b, s in zip(planted, PLANTED_SCALES)}

  def normal(*shape, scale=1.0):
    w = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * (0.02 * scale)
    return w.to(torch.bfloat16).cpu()

  def ones(n):
    return torch.ones(n, dtype=torch.bfloat16)

  tensors = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": ones(D),
             "lm_head.weight": normal(V, D)}
  for i in range(L):
    p = f"model.layers.{i}."
    tensors.update({
        p + "input_layernorm.weight": ones(D), p + "post_attention_layernorm.weight": ones(D),
        p + "self_attn.q_proj.weight": normal(q, D), p + "self_attn.k_proj.weight": normal(kv, D),
        p + "self_attn.v_proj.weight": normal(kv, D),
        p + "self_attn.o_proj.weight": normal(D, q, scale=scale_of.get(i, 1.0)),
        p + "mlp.gate_proj.weight": normal(F, D), p + "mlp.up_proj.weight": normal(F, D),
        p + "mlp.down_proj.weight": normal(D, F)})
  generated = time.perf_counter() - t0
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
  return {"path": path, "parameters": int(sum(t.numel() for t in tensors.values())),
          "bytes": int(nbytes), "planted_blocks": planted, "planted_scales": list(PLANTED_SCALES),
          "expected_first_picks": [2 * b for b in planted], "device": device,
          "generate_seconds": generated, "seconds": time.perf_counter() - t0}


# ============================================================================== part: JAX


def bf16_matmul_rate(n: int, repeats: int, inner: int = 10) -> dict:
  """The chip's bfloat16 matmul rate: a jitted n x n x n product of random bfloat16 matrices,
  `inner` calls back to back per timing (dispatch overlaps), median of `repeats`."""
  # lazy: JAX, in the JAX part only
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((n, n), np.float32), jnp.bfloat16)
  f = jax.jit(jnp.matmul)
  for _ in range(3):
    f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(a, b)
    out.block_until_ready()
    times.append((time.perf_counter() - t0) / inner)
  sec = statistics.median(times)
  return {"shape": f"{n}x{n}x{n}", "dtype": "bfloat16", "seconds_median": sec,
          "flops_per_second": 2.0 * n ** 3 / sec, "repeats": repeats, "inner": inner}


def _host_device():
  """JAX's CPU device, where the checkpoint is loaded and pruned before a phase puts it on the
  accelerator (so that the device never holds the dense and the pruned model at once); the
  default device where the CPU backend is not enabled."""
  # lazy: JAX, in the JAX part only
  import jax
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return jax.devices()[0]


def _to_device(model, device):
  """The NNX model with every array put on `device`."""
  # lazy: JAX and Flax, in the JAX part only
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, device))


def part_jax(spec: dict) -> dict:
  """The chip's bfloat16 matmul rate; prefill/decode throughput of the 25%-pruned then the dense
  model; then the scorer's greedy search on the dense model (3 steps), each phase's peak memory."""
  # lazy: JAX and the project, in the JAX part only
  import jax
  import jax.numpy as jnp

  from finercut_jax import Scorer, SearchSpec, greedy_search, load_model
  from finercut_jax.evaluation import throughput
  deadline = spec["deadline"]
  device = jax.devices()[0]
  out = {"device_kind": device.device_kind, "memory_start": device_memory(device)}
  out["matmul"] = bf16_matmul_rate(spec["matmul_size"], spec["matmul_repeats"])

  on_host = jax.sharding.SingleDeviceSharding(_host_device())
  t0 = time.perf_counter()
  dense_host, _ = load_model(spec["checkpoint"], jnp.bfloat16, tokenizer=False,
                             sharding_fn=lambda name, shape: on_host)
  jax.block_until_ready(dense_host.params())
  out["load_seconds"] = time.perf_counter() - t0
  cfg = dense_host.config
  keep = prune_mask(cfg.num_layers)

  # Smallest footprint first: the pruned model alone, then the dense one, then the scorer on it.
  out["throughput"] = {}
  for name, keep_mask in (("pruned", keep), ("dense", None)):
    if _now() > deadline:
      out.setdefault("skipped", []).append(f"throughput {name}: out of time")
      continue
    before = device_memory(device)
    model = _to_device(dense_host if keep_mask is None else dense_host.prune(keep_mask), device)
    result = throughput.measure(model, **spec["throughput"])
    removed = np.zeros_like(keep) if keep_mask is None else ~keep_mask
    result["removed"] = {"attn": int(removed[:, 0].sum()), "ffn": int(removed[:, 1].sum())}
    result["memory"] = _phase_memory(before, device_memory(device))
    out["throughput"][name] = result
    if keep_mask is not None:
      del model  # before the dense model arrives: the device holds one model at a time
  if "dense" in out["throughput"] and "pruned" in out["throughput"]:
    out["throughput"]["pruned_over_dense"] = throughput.relative_to(out["throughput"]["dense"],
                                                                    out["throughput"]["pruned"])

  if _now() > deadline or "dense" not in out["throughput"]:
    out.setdefault("skipped", []).append("scorer: out of time")
    return out
  tokens = np.load(spec["tokens"])
  del dense_host  # the dense model stays on the device, from its throughput phase
  before = device_memory(device)
  sspec = SearchSpec(num_layers=cfg.num_layers, num_steps=spec["steps"])
  marks, records = [], []

  def on_step(record):
    marks.append(time.perf_counter())
    records.append(record)
    print(f"[scorer] step {record.step}: remove {record.name} (sublayer {record.sublayer}), "
          f"score {record.score:.6g}, {marks[-1] - (marks[-2] if len(marks) > 1 else t1):.2f} s",
          file=sys.stderr, flush=True)
    if _now() > deadline and len(records) < spec["steps"]:
      raise _OutOfTime()

  t0 = time.perf_counter()
  scorer = Scorer(model, tokens, metric="js_official", chunk_width=spec["chunk_width"],
                  position_block=spec["position_block"], max_candidates=2 * cfg.num_layers,
                  state_memory=spec["state_memory_gb"] * GIB)
  del model  # the scorer holds the parameters (placed on its mesh: the same arrays here)
  jax.block_until_ready(scorer.reference)
  t1 = time.perf_counter()
  try:
    greedy_search(scorer, sspec, on_step=on_step)
    stopped = None
  except _OutOfTime:
    stopped = f"out of time after {len(records)} of {spec['steps']} steps"
  walls = [b - a for a, b in zip([t1] + marks[:-1], marks)]
  steps = []
  for r, wall in zip(records, walls):
    st = r.stats or {}
    compute = max(wall - st.get("compile_seconds", 0.0), 1e-12)
    steps.append({"step": r.step, "sublayer": r.sublayer, "name": r.name, "score": r.score,
                  "seconds": wall, "score_seconds": r.seconds,
                  "compile_seconds": st.get("compile_seconds", 0.0), "flops": st.get("flops"),
                  "flops_per_second": st.get("flops", 0.0) / compute,
                  "evaluations": st.get("evaluations"),
                  "naive_evaluations": st.get("naive_evaluations"),
                  "margin": margin(r.scores or {}, r.lower_bounds or ()),
                  "scores": r.scores, "lower_bounds": list(r.lower_bounds or ())})
  peak = out["matmul"]["flops_per_second"]
  flops = sum(s["flops"] or 0.0 for s in steps)
  compute = sum(s["seconds"] - s["compile_seconds"] for s in steps)
  out["scorer"] = {
      "metric": "js_official", "chunk_width": spec["chunk_width"],
      "position_block": scorer.position_block, "state_memory_gb": spec["state_memory_gb"],
      "num_states": scorer.num_states, "tokens": list(tokens.shape),
      "setup_seconds": t1 - t0, "steps": steps, "stopped": stopped,
      "search_seconds": sum(walls), "flops": flops,
      "flops_per_second": flops / compute if compute > 0 else None,
      "fraction_of_bf16_matmul_rate": flops / compute / peak if compute > 0 else None,
      "memory": _phase_memory(before, device_memory(device))}
  return out


# ============================================================================== part: official


def part_official(spec: dict) -> dict:
  """The official loop on the same checkpoint and tokens, on torch's device: as many of the
  requested steps as its measured per-candidate time fits before the deadline."""
  # lazy: torch and transformers, in the official part only
  import torch
  from transformers import AutoModelForCausalLM

  from benchmarks.official_baseline import collect_logits, official_greedy, score_pruned_set
  device = torch_device()
  t0 = time.perf_counter()
  hf = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.bfloat16,
                                            local_files_only=True)
  hf = hf.to(device).eval()
  load_seconds = time.perf_counter() - t0
  tokens = np.load(spec["tokens"])
  num_candidates = 2 * int(hf.config.num_hidden_layers)
  # One dense pass and one candidate, timed, to size the run.
  t0 = time.perf_counter()
  ref = collect_logits(hf, torch.as_tensor(tokens, dtype=torch.long))
  reference_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  score_pruned_set(hf, torch.as_tensor(tokens, dtype=torch.long), ref, [0], "js_official")
  candidate_seconds = time.perf_counter() - t0
  del ref
  def estimate(k):  # seconds for k steps: the dense pass, then C, C-1, ... candidates
    return reference_seconds + candidate_seconds * sum(num_candidates - i for i in range(k))

  left = spec["deadline"] - _now()
  steps = max((k for k in range(spec["steps"] + 1) if estimate(k) <= left), default=0)
  out = {"device": device, "load_seconds": load_seconds,
         "probe": {"reference_seconds": reference_seconds,
                   "candidate_seconds": candidate_seconds},
         "estimated_seconds_all_steps": estimate(spec["steps"]), "requested_steps": spec["steps"],
         "steps_run": steps}
  if steps == 0:
    out["skipped"] = (f"one step needs ~{estimate(1):.0f} s (estimated), {max(left, 0):.0f} s "
                      f"left in the budget")
    return out
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  records = official_greedy(hf, tokens, steps, metric="js_official",
                            log=lambda line: print("[official]", line, file=sys.stderr, flush=True))
  out.update({
      "reference_seconds": records[0]["reference_seconds"],
      "steps": [{"step": r["step"], "sublayer": r["sublayer"], "name": f"{r['kind']}{r['block']}",
                 "score": r["score"], "seconds": r["seconds"], "num_candidates": len(r["scores"]),
                 "margin": margin(r["scores"]),
                 "scores": {str(k): v for k, v in r["scores"].items()}} for r in records],
      "torch_peak_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None})
  return out


PARTS = {"parity": part_parity, "checkpoint": part_checkpoint, "jax": part_jax,
         "official": part_official}


# ============================================================================== driver


def _run_part(name: str, spec: dict, isolate: bool, deadline: float) -> dict:
  """Runs one part, in a fresh interpreter (`isolate`) or in this one; returns its result, or
  `{"error": ...}` if it failed (a traceback goes to stderr) or ran past the deadline."""
  if not isolate:
    try:
      return PARTS[name](spec)
    except Exception as e:  # noqa: BLE001  (a failed part is reported; the rest still run)
      traceback.print_exc()
      return {"error": f"{type(e).__name__}: {e}"}
  spec_path = os.path.join(spec["workdir"], f"spec_{name}.json")
  result_path = os.path.join(spec["workdir"], f"result_{name}.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
  if name == "parity":  # torch and JAX share the device here: JAX takes memory as it needs it
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  cmd = [sys.executable, "-m", "benchmarks.device_check", "--part", name, "--spec", spec_path,
         "--result", result_path]
  # A grace period past the deadline: a part checks the deadline itself between its phases.
  timeout = max(deadline - _now(), 1.0) + 60.0
  try:
    proc = subprocess.run(cmd, env=env, cwd=_REPO, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"killed after {timeout:.0f} s (past the budget)"}
  if proc.returncode != 0 or not os.path.exists(result_path):
    return {"error": f"exit status {proc.returncode} (its traceback is on stderr above)"}
  with open(result_path) as f:
    return json.load(f)


def _compare(jax_part: dict, official: dict, steps: int) -> dict:
  """Same picks, and the time ratio over the steps both sides ran (setup and reference pass
  included, the official side's as it ran them; model loading left out)."""
  ours = (jax_part.get("scorer") or {}).get("steps") or []
  theirs = official.get("steps") or []
  k = min(len(ours), len(theirs))
  out = {"steps_compared": k, "steps_requested": steps}
  if k == 0:
    return out
  picks_ours = [s["sublayer"] for s in ours[:k]]
  picks_theirs = [s["sublayer"] for s in theirs[:k]]
  diffs = []
  for a, b in zip(theirs[:k], ours[:k]):
    bounds = {str(s) for s in b.get("lower_bounds", ())}
    diffs += [abs(a["scores"][key] - b["scores"][key]) / max(abs(a["scores"][key]), 1e-30)
              for key in a["scores"] if key in (b["scores"] or {}) and key not in bounds]
  scorer = jax_part["scorer"]
  ours_total = scorer["setup_seconds"] + sum(s["seconds"] for s in ours[:k])
  theirs_total = official["reference_seconds"] + sum(s["seconds"] for s in theirs[:k])
  ours_compute = sum(s["seconds"] - s["compile_seconds"] for s in ours[:k])
  out.update({
      "picks_scorer": picks_ours, "picks_official": picks_theirs,
      "picks_equal": picks_ours == picks_theirs,
      "max_rel_score_diff": max(diffs) if diffs else None,
      "scorer_seconds": ours_total, "official_seconds": theirs_total,
      "ratio": theirs_total / ours_total,
      "ratio_steps_without_compile": sum(s["seconds"] for s in theirs[:k]) / ours_compute,
      "per_step_ratio": [a["seconds"] / b["seconds"] for a, b in zip(theirs[:k], ours[:k])]})
  if k < steps and official.get("estimated_seconds_all_steps"):
    out["official_estimated_seconds_all_steps"] = official["estimated_seconds_all_steps"]
  return out


def _fmt_rate(x) -> str:
  if x is None:
    return "-"
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def _gib(x) -> str:
  return "-" if x is None else f"{x / GIB:.1f}"


def summary_line(result: dict) -> str:
  """The one line the run ends with: status first, then each part's headline figures."""
  env = result.get("environment") or {}
  versions = env.get("versions") or {}
  parts = [result["status"].upper(), (f"{env.get('device_kind', '?')} "
                                      f"({env.get('jax_backend', '?')}, "
                                      f"jax {versions.get('jax', '?')})")]
  parity = result.get("parity") or {}
  rows = parity.get("logits") or []
  if rows:
    f32 = [r["max_abs_err"] for r in rows if r["dtype"] == "float32"]
    bf16 = [r["rms_err"] / max(r["torch_bf16_rms_err"], 1e-30) for r in rows
            if r["dtype"] == "bfloat16"]
    parts.append(f"parity {sum(r['pass'] for r in rows)}/{len(rows)} pass (f32 max err "
                 f"{max(f32):.1e}, bf16 rms err {max(bf16):.2f}x transformers' bf16)")
  greedy = parity.get("greedy")
  if greedy:
    parts.append(f"greedy picks {'equal' if greedy['picks_equal'] else 'DIFFER'} "
                 f"({greedy['steps']} steps, max rel score diff "
                 f"{greedy['max_rel_score_diff']:.1e})")
  jax_part = result.get("jax") or {}
  scorer = jax_part.get("scorer")
  comparison = result.get("comparison") or {}
  if scorer:
    line = (f"scorer {len(scorer['steps'])} steps "
            f"{scorer['setup_seconds'] + scorer['search_seconds']:.1f} s")
    frac = scorer.get("fraction_of_bf16_matmul_rate")
    if frac is not None:
      line += (f", {_fmt_rate(scorer['flops_per_second'])}FLOP/s = {100 * frac:.0f}% of bf16 "
               f"matmul {_fmt_rate(jax_part['matmul']['flops_per_second'])}FLOP/s")
    parts.append(line)
  if comparison.get("steps_compared"):
    parts.append(f"official {comparison['official_seconds']:.1f} s over "
                 f"{comparison['steps_compared']} step(s): {comparison['ratio']:.2f}x, picks "
                 f"{'equal' if comparison['picks_equal'] else 'DIFFER'}")
  tput = jax_part.get("throughput") or {}
  if "dense" in tput and "pruned" in tput:
    d, p = tput["dense"], tput["pruned"]
    parts.append(f"prefill {_fmt_rate(d['prefill_tokens_per_s'])}/"
                 f"{_fmt_rate(p['prefill_tokens_per_s'])} tok/s, decode "
                 f"{_fmt_rate(d['decode_tokens_per_s'])}/{_fmt_rate(p['decode_tokens_per_s'])} "
                 f"tok/s (dense/{int(100 * PRUNE_RATIO)}% pruned)")
  peaks = [(name, (tput.get(name) or {}).get("memory")) for name in ("pruned", "dense")]
  peaks.append(("scorer", (scorer or {}).get("memory")))
  shown = [f"{name} {_gib(m['peak_bytes'])}" for name, m in peaks if m]
  if shown:
    parts.append("peak GiB " + ", ".join(shown))
  if result.get("skipped"):
    parts.append("skipped: " + ", ".join(s["part"] for s in result["skipped"]))
  if result.get("errors"):
    parts.append("errors: " + ", ".join(e["part"] for e in result["errors"]))
  parts.append(f"{result['wall_seconds']:.0f} s -> {result['out']}")
  return SUMMARY_PREFIX + " " + " | ".join(parts)


def _status(result: dict) -> str:
  """fail: a check failed or a part broke; incomplete: parts were skipped for time; else pass."""
  parity = result.get("parity") or {}
  failed = bool(result.get("errors")) or parity.get("pass") is False
  if (result.get("comparison") or {}).get("picks_equal") is False:
    failed = True
  if failed:
    return "fail"
  return "incomplete" if result.get("skipped") else "pass"


def _default_out(kind: str, tiny: bool) -> str:
  slug = "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_") or "device"
  return os.path.join(_REPO, "benchmarks", "results",
                      f"device_check_{slug}{'_tiny' if tiny else ''}.json")


def run(args, isolate: bool) -> dict:
  """The whole check; returns the result (also written to the JSON)."""
  start = _now()
  deadline = start + args.budget_s
  mode = "tiny" if args.tiny else "full"
  settings = dict(MODES[mode])
  workdir = args.workdir or tempfile.mkdtemp(prefix="device_check_")
  os.makedirs(workdir, exist_ok=True)
  result = {"check": "device_check", "mode": mode, "isolated_parts": isolate,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "budget_s": args.budget_s, "settings": settings,
            "tolerances": {"float32_atol": F32_ATOL, "bfloat16_rms_factor": BF16_FACTOR,
                           "bfloat16_floor": BF16_FLOOR, "greedy_rtol": GREEDY_RTOL},
            "skipped": [], "errors": []}
  base = {"workdir": workdir, "deadline": deadline, **settings}

  def part(name: str) -> dict | None:
    left = deadline - _now()
    need = MIN_SECONDS[mode].get(name, 0)
    if name != "parity" and left < need:
      result["skipped"].append({"part": name, "reason": f"{left:.0f} s left, needs {need} s"})
      return None
    print(f"[device_check] {name} ({left:.0f} s left)", file=sys.stderr, flush=True)
    t0 = _now()
    out = _run_part(name, base, isolate, deadline)
    out["part_seconds"] = _now() - t0
    if "error" in out:
      result["errors"].append({"part": name, "error": out["error"]})
    return out

  try:
    parity = part("parity")
    result["environment"] = parity.pop("environment", None)
    result["parity"] = parity
    env = result["environment"] or {}
    if env.get("jax_backend") == "cpu" and not args.tiny:
      result["errors"].append({"part": "driver", "error": "JAX's default backend is the CPU: no "
                               "accelerator here; use --tiny on a CPU"})
    else:
      checkpoint = part("checkpoint")
      if checkpoint and "error" not in checkpoint:
        result["checkpoint"] = checkpoint
        tokens = np.random.default_rng(1).integers(
            0, settings["model"]["vocab_size"],
            (settings["num_sequences"], settings["seq_len"])).astype(np.int32)
        base["tokens"] = os.path.join(workdir, "tokens.npy")
        np.save(base["tokens"], tokens)
        base["checkpoint"] = checkpoint["path"]
        result["jax"] = part("jax")
        same_device = args.tiny or env.get("jax_backend") == "cpu" or (
            env.get("torch_device") == "cuda" and env.get("jax_backend") == "gpu")
        if not same_device:
          result["skipped"].append({"part": "official", "reason": (
              f"torch has no {env.get('device_kind')}: the official PyTorch loop would run on "
              f"{env.get('torch_device')}, not on the device the scorer ran on")})
        elif result["jax"] and "scorer" in result["jax"]:
          official = part("official")
          result["official"] = official
          if official and official.get("skipped"):
            result["skipped"].append({"part": "official", "reason": official["skipped"]})
          if official and "steps" in official:
            result["comparison"] = _compare(result["jax"], official, settings["steps"])
      elif checkpoint:
        result["checkpoint"] = checkpoint
  finally:
    if not args.keep_workdir and not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  result["wall_seconds"] = _now() - start
  result["status"] = _status(result)
  kind = (result.get("environment") or {}).get("device_kind") or "unknown"
  result["out"] = args.out or _default_out(kind, args.tiny)
  result["summary"] = summary_line(result)
  os.makedirs(os.path.dirname(os.path.abspath(result["out"])), exist_ok=True)
  with open(result["out"], "w") as f:
    json.dump(result, f, indent=1, default=float)
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="tiny shapes for every part (any machine)")
  p.add_argument("--budget_s", type=float, default=480.0, help="time for the whole run")
  p.add_argument("--out", default=None, help="the JSON (default: benchmarks/results/"
                 "device_check_<device kind>[_tiny].json)")
  p.add_argument("--isolate", default=None, action=argparse.BooleanOptionalAction,
                 help="each part in its own process (default: on, off with --tiny)")
  p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary "
                 "directory, removed at the end); needs room for the 8B checkpoint (16 GB)")
  p.add_argument("--keep_workdir", action="store_true")
  # Internal: one part in this process (the isolated mode's children).
  p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  if args.part:
    with open(args.spec) as f:
      spec = json.load(f)
    out = PARTS[args.part](spec)
    with open(args.result, "w") as f:
      json.dump(out, f, default=float)
    return 0
  isolate = not args.tiny if args.isolate is None else args.isolate
  if not isolate:
    # torch and JAX share one process (and the device, if any): JAX takes memory as it needs it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  result = run(args, isolate)
  print(result["summary"], flush=True)
  return 1 if result["status"] == "fail" else 0


if __name__ == "__main__":
  sys.exit(main())
