r"""Per-device memory of a search too big for this machine, from ahead-of-time compilation.

Builds the scorer of a job config over abstract parameters (`jax.ShapeDtypeStruct`, sharded by the
same rules as a real run) on a simulated mesh of CPU devices, compiles its three programs (the
dense reference pass, the per-step prefix pass and the candidate step) and reports, per device,
what `compiled.memory_analysis()` says next to the arrays the scorer keeps between programs.
Nothing is allocated, so Llama-3-70B sizes on a laptop:

  python -m benchmarks.aot_memory --config=configs/llama3_70b.py --devices=8
  python -m benchmarks.aot_memory --config=configs/llama3_70b.py --devices=32 \
      --config.scorer.mesh_model=8 --device_memory_gib=95   # e.g. a v5p-64 slice (32 chips)

The architecture comes from the checkpoint's config.json when `model.path` exists, else from the
published config of the paper's models (`ARCHITECTURES`). CPU compilation sizes buffers as an
accelerator backend would for the same program, but layouts and fusion differ by backend: treat the
figures as the scorer's own budget (weights, caches, kept states, working set), not a guarantee.

With `--topology=NAME` (a TPU slice: v5p:2x2x4, v5e:8x8, v4:2x2x4, v6e:4x4, ...) the programs are
compiled by the real TPU compiler (libtpu), deviceless, on this machine: the mesh is laid over the
slice's abstract chips (`jax.experimental.topologies`), and the figures are the TPU compiler's own,
per chip, with its cost analysis (FLOPs, bytes accessed). The evaluation's scoring program
(`evaluation.lm.score_slots`, the dense model in the pruned layout, one batch of the largest
sequence bucket) is compiled too and sized apart: the scorer is freed before the evaluation. The
chip's HBM comes from the topology name unless --device_memory_gib is given. The last line of the
output is the verdict alone: `fits` or `DOES NOT FIT`. libtpu lives in its own environment
(`bash benchmarks/setup_tpu_aot.sh` makes .venv-tpu):

  .venv-tpu/bin/python -m benchmarks.aot_memory --config=configs/llama3_70b.py \
      --topology=v5p:2x2x4 --config.scorer.mesh_model=4 --config.scorer.state_memory_gb=39.07

--fit_states also finds the largest scorer.state_memory_gb that leaves --headroom of HBM free, by
compiling the step program at each size tried.
"""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import topologies
from ml_collections import config_flags

# Importing these starts no JAX backend: `measure` and `tpu_devices` still choose the platform
# (simulated CPU devices; libtpu's environment) before the first computation.
from finercut_jax.evaluation.lm import score_slots
from finercut_jax.evaluation.run import resolve_eval_config, scoring_config
from finercut_jax.model import loading
from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.modules import Llama, logical_axes, param_shapes
from finercut_jax.parallel import sharding
from finercut_jax.rundir.atomic import atomic_write_json
from finercut_jax.scoring.scorer import Scorer, sublayer_flops
from finercut_jax.search.greedy import SearchSpec

_CONFIG = config_flags.DEFINE_config_file("config", None, "A job config file (configs/*.py).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (the mesh spans all of them).")
_DEVICE_MEMORY = flags.DEFINE_float(
    "device_memory_gib", 80.0, "Memory of one accelerator, GiB, for the verdict (H100: 80); with "
    "--topology, the chip's HBM by its generation (v5p 95, v5e 16, v4 32, v6e 32) unless given.")
_OUT = flags.DEFINE_string("out", None, "Also write the figures to this JSON file.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "A TPU slice (e.g. v5p:2x2x4, v5e:8x8, v4:2x2x4): compile with the TPU "
    "compiler, deviceless, instead of on simulated CPU devices (needs libtpu: "
    "benchmarks/setup_tpu_aot.sh, then .venv-tpu/bin/python).")
_EVAL_SLOTS = flags.DEFINE_integer("eval_slots", 16, "With --topology: scored positions per row of "
                                   "the evaluation batch (a slot bucket; 16 is the smallest).")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "With --topology: share of a chip's HBM to leave "
                               "free when suggesting scorer.state_memory_gb.")
_FIT_STATES = flags.DEFINE_bool(
    "fit_states", False, "With --topology: find the largest scorer.state_memory_gb whose search "
    "peak leaves --headroom of HBM free, by compiling the step program at each size tried (the "
    "step's temporaries can grow with the kept states); else a linear estimate.")

# config.json fields of the paper's models (the meta-llama and mistralai repositories on the
# Hugging Face hub), keyed by checkpoint directory name.
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
_LLAMA2 = dict(vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096)
ARCHITECTURES = {
    "Meta-Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_layers=32,
                            num_heads=32, num_kv_heads=8, **_LLAMA3),
    "Meta-Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_layers=80,
                             num_heads=64, num_kv_heads=8, **_LLAMA3),
    "Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_layers=32,
                          num_heads=32, num_kv_heads=32, **_LLAMA2),
    "Llama-2-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_layers=40,
                           num_heads=40, num_kv_heads=40, **_LLAMA2),
    "Llama-2-70b-hf": dict(hidden_size=8192, intermediate_size=28672, num_layers=80,
                           num_heads=64, num_kv_heads=8, **_LLAMA2),
    # mistralai/Mixtral-8x7B-v0.1 (rms_norm_eps 1e-5, no sliding window).
    "Mixtral-8x7B-v0.1": dict(hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, vocab_size=32000, rope_theta=1e6,
                              max_position_embeddings=32768, model_type="mixtral", num_experts=8,
                              num_experts_per_tok=2),
}

GIB = 2**30


def model_config(path: str):
  if os.path.exists(loading.resolve_path(path)):
    return loading.load_config(loading.resolve_path(path))
  name = os.path.basename(os.path.normpath(path))
  if name not in ARCHITECTURES:
    raise app.UsageError(f"{path} does not exist and is not one of the known architectures "
                         f"{sorted(ARCHITECTURES)}: point model.path at a checkpoint directory")
  arch = ARCHITECTURES[name]
  return LlamaConfig(head_dim=arch["hidden_size"] // arch["num_heads"], **arch)


def per_device_bytes(tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def abstract_scorer(config, cfg, dtype, mesh, state_memory_gb=None):
  """The job config's scorer over abstract parameters on `mesh`, and the candidate pool
  (`state_memory_gb` overrides the config's)."""
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  tokens = np.zeros((config.data.num_sequences, config.data.seq_len), np.int32)
  pool = SearchSpec(num_layers=cfg.num_layers, pool=config.search.pool).pool_candidates()
  scorer = Scorer(Llama.from_params(cfg, shapes), tokens, metric=config.search.metric,
                  chunk_width=config.scorer.chunk_width,
                  position_block=config.scorer.position_block, mesh=mesh,
                  max_candidates=len(pool), state_every=config.scorer.state_every,
                  state_memory=(config.scorer.state_memory_gb if state_memory_gb is None
                                else state_memory_gb) * GIB)
  return scorer, pool


def scorer_held_bytes(scorer) -> dict:
  """Per device, what the scorer keeps between its programs."""
  held = {"params": scorer.params, "prefix cache": scorer.prefix, "kept states": scorer.states,
          "reference": scorer.reference,
          "embeddings, targets, weights": (scorer.h0, scorer.targets, scorer.weights)}
  return {name: per_device_bytes(tree) for name, tree in held.items()}


def measure(config, devices: int) -> dict:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)

  cfg = model_config(config.model.path)
  dtype = jnp.dtype(config.model.dtype)
  mesh = sharding.make_mesh(cand=config.scorer.mesh_cand or None, model=config.scorer.mesh_model)
  scorer, pool = abstract_scorer(config, cfg, dtype, mesh)
  held_bytes = scorer_held_bytes(scorer)
  programs = {}
  for name, lowered in scorer.lower().items():
    m = lowered.compile().memory_analysis()
    programs[name] = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                          aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                          code=m.generated_code_size_in_bytes)
  # Between programs the device holds what the scorer keeps; a program adds its temporaries and
  # the outputs it does not write in place (the prefix program donates the prefix cache, the step
  # the kept states).
  resident = sum(held_bytes.values())
  peak = resident + max(p["temporaries"] + p["outputs"] - p["aliased"] for p in programs.values())
  return {"model": config.model.path, "dtype": str(dtype), "architecture": cfg.to_dict(),
          "mesh": dict(mesh.shape), "devices": devices,
          "calibration": [config.data.num_sequences, config.data.seq_len],
          "chunk_width": scorer.chunk_width, "position_block": scorer.position_block,
          "candidates": len(pool), "kept_states": [scorer.num_states, scorer.state_every],
          "held_bytes": held_bytes, "programs": programs, "resident_bytes": resident,
          "peak_bytes": peak}


def report(r: dict, device_memory_gib: float) -> str:
  gib = lambda b: f"{b / GIB:8.2f} GiB"
  lines = [f"{r['model']} ({r['dtype']}) on a simulated {r['mesh']} mesh of {r['devices']} "
           f"devices; calibration {r['calibration'][0]} x {r['calibration'][1]}, "
           f"{r['candidates']} candidates in chunks of {r['chunk_width']}, kept states: "
           f"{r['kept_states'][0]} per candidate (every {r['kept_states'][1]} sublayers)",
           "", "held per device between programs:"]
  lines += [f"  {name:30s}{gib(b)}" for name, b in r["held_bytes"].items()]
  lines += [f"  {'total':30s}{gib(r['resident_bytes'])}", "",
            "compiled programs, per device (memory_analysis):",
            f"  {'':10s}{'arguments':>14s}{'outputs':>14s}{'aliased':>14s}{'temporaries':>14s}"]
  for name, p in r["programs"].items():
    lines.append(f"  {name:10s}" + "".join(f"{gib(p[k]):>14s}" for k in
                                            ("arguments", "outputs", "aliased", "temporaries")))
  if r["dtype"] == "bfloat16":
    lines += ["", "note: XLA:CPU has no bfloat16 matmul; it converts bfloat16 weights to float32 and "
              "hoists that out of the layer loop, so the temporaries above include float32 copies "
              "of weights that a GPU/TPU does not make (compile with --config.model.dtype=float32 "
              "to see the working set alone)"]
  verdict = "fits" if r["peak_bytes"] <= device_memory_gib * GIB else "DOES NOT FIT"
  lines += ["", f"peak per device (held + largest program's temporaries and new outputs): "
            f"{gib(r['peak_bytes']).strip()}: {verdict} in {device_memory_gib:g} GiB"]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- TPU, deviceless

# HBM of one chip, GiB, by the generation in a topology name (v5e slices are also "v5litepod").
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0}


def parse_topology(name: str) -> tuple[str, int]:
  """`(generation, chips)` of a topology name such as `v5p:2x2x4`."""
  gen, sep, dims = name.partition(":")
  try:
    chips = math.prod(int(d) for d in dims.split("x")) if sep else 0
  except ValueError:
    chips = 0
  if not gen or chips < 1:
    raise app.UsageError(f"--topology={name!r}: expected GENERATION:AxB[xC], e.g. v5p:2x2x4, "
                         f"v5e:8x8, v4:2x2x4")
  return gen.lower(), chips


def accelerator_type(gen: str, chips: int) -> str:
  """The slice's accelerator type as libtpu names it (v4 and v5p count TensorCores, 2 a chip)."""
  if gen in ("v4", "v5p"):
    return f"{gen}-{2 * chips}"
  if gen in ("v5e", "v5litepod"):
    return f"v5litepod-{chips}"
  return f"{gen}-{chips}"


def tpu_devices(topology: str):
  """The abstract chips of a TPU slice, for compiling without one."""
  gen, chips = parse_topology(topology)
  # libtpu looks for the TPU of the host it runs on (metadata server, worker addresses) and logs
  # errors when there is none; naming the slice quiets that. Compiling needs neither.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(gen, chips))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu takes a lock file (/tmp/libtpu_lockfile) so that one process owns the TPU; there is
  # none here, and runs for several slices may go side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # The default backend stays the CPU (the few concrete arrays the scorer makes live there); the
  # TPU backend itself cannot start without a TPU, and is not needed.
  jax.config.update("jax_platforms", "cpu")
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    if len(devices) == 2 * chips:
      # v4 describes one device per TensorCore unless asked for megacore mode (one device per
      # chip, its two cores together), the mode a v4 runtime uses by default.
      devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                             chip_config_name="megacore").devices
  except Exception as e:  # no libtpu, or a name it does not know
    raise app.UsageError(
        f"cannot describe TPU topology {topology!r}: {type(e).__name__}: {e}\n"
        f"(the TPU compiler comes with libtpu: `bash benchmarks/setup_tpu_aot.sh`, then run with "
        f".venv-tpu/bin/python)") from e
  if len(devices) != chips:
    raise app.UsageError(f"topology {topology!r} has {len(devices)} chips, expected {chips}")
  return devices


def compile_stats(lowered) -> dict:
  """Compiles a lowered program: its per-chip memory and cost analysis and the compile time; a
  program the TPU compiler rejects as over HBM gives its message under "error"."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax.errors.JaxRuntimeError
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
      raise
    return {"error": message.strip(), "seconds": time.perf_counter() - start}
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program in older JAX releases
    cost = cost[0] if cost else {}
  cost = cost or {}
  return dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
              aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
              code=m.generated_code_size_in_bytes, flops=float(cost.get("flops", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", 0.0)),
              optimal_seconds=float(cost.get("optimal_seconds", 0.0)), seconds=seconds)


def new_bytes(p: dict) -> int:
  """What a program adds to what is held: its temporaries and the outputs not written in place."""
  return p["temporaries"] + p["outputs"] - p["aliased"]


def replicated_weights(cfg, mesh) -> list[str]:
  """Head-split weights that stay whole on every chip because the heads do not divide the model
  axis (sharding.logical_spec keeps a head on one chip)."""
  if mesh.shape[sharding.MODEL] == 1:
    return []
  fn = sharding.param_sharding_fn(mesh, cfg)
  layers, axes = param_shapes(cfg)["layers"], logical_axes(cfg)
  return [name for name, shape in layers.items()
          if {"q_heads", "kv_heads"} & set(axes[name])
          and sharding.MODEL not in fn(name, shape).spec]


def lower_evaluation(config, cfg, dtype, mesh, slots: int):
  """The evaluation's scoring program (`evaluation.lm.score_slots`) for the dense model,
  on one batch of the largest sequence bucket (as `loglikelihood_tokens` sizes it).
  Returns (lowered program, batch shape, per-chip bytes of its inputs)."""
  scoring = scoring_config(resolve_eval_config(config.get("eval")).scoring)
  max_length = scoring.max_length or cfg.max_position_embeddings  # 0: the model's, as lm-eval
  seq = max([b for b in scoring.seq_buckets if b <= max_length] or
            [min(scoring.seq_buckets)])
  rows = max(1, min(scoring.max_batch, scoring.tokens_per_batch // seq))
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  graphdef, params = nnx.split(Llama.from_params(cfg, shapes))  # the dense model: all kept
  params = sharding.shard_state(params, mesh, cfg)
  rep = sharding.replicated(mesh)
  inputs = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
            for shape in ((rows, seq),) * 3 + ((rows, slots),) * 2]  # tokens, positions,
  # segments, slot positions, slot targets
  lowered = score_slots.lower(graphdef, params, *inputs)
  held = {"params": per_device_bytes(params),
          "tokens, positions, segments, slots": per_device_bytes(inputs)}
  return lowered, {"rows": rows, "seq_len": seq, "slots": slots,
                   "tokens_per_batch": scoring.tokens_per_batch}, held


def state_budget_gb(levels: int, level_bytes: int) -> float:
  """The scorer.state_memory_gb that keeps `levels` levels: rounded up to 0.01 GiB, so that the
  scorer's floor division keeps every one of them."""
  return math.ceil(levels * level_bytes / GIB * 100) / 100


def fit_states(config, cfg, dtype, mesh, fixed_new: int, budget: float, level: int, useful: int,
               known: dict) -> dict:
  """The most kept-state levels whose search peak stays within `budget` bytes per chip, by
  bisection, compiling the step program at each size tried (`fixed_new`: what the reference and
  prefix programs add, which the states do not change; `known`: peaks already measured)."""
  peaks = dict(known)

  def peak(levels):
    if levels not in peaks:
      scorer, _ = abstract_scorer(config, cfg, dtype, mesh, state_budget_gb(levels, level))
      step = compile_stats(scorer.lower()["step"])
      peaks[levels] = (None if "error" in step else
                       sum(scorer_held_bytes(scorer).values()) + max(fixed_new, new_bytes(step)))
      logging.info("%d levels of kept states: search peak %s (step compiled in %.0f s)",
                   levels, "over HBM" if peaks[levels] is None else
                   f"{peaks[levels] / GIB:.2f} GiB", step["seconds"])
    return peaks[levels]

  ok = lambda levels: peak(levels) is not None and peak(levels) <= budget
  lo, hi = 0, useful  # lo fits (checked below), hi + 1 does not
  if not ok(0):
    return {"levels": 0, "peak_bytes": peak(0), "fits": False, "tried": sorted(peaks)}
  fitting = [k for k in peaks if ok(k)]
  lo = max(fitting)
  failing = [k for k in peaks if not ok(k)]
  if failing:
    hi = min(failing) - 1
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if ok(mid):
      lo = mid
    else:
      hi = mid - 1
  return {"levels": lo, "peak_bytes": peak(lo), "fits": True, "tried": sorted(peaks)}


def measure_tpu(config, topology: str, eval_slots: int, headroom: float, hbm_gib: float,
                search_states: bool = False) -> dict:
  devices = tpu_devices(topology)

  cfg = model_config(config.model.path)
  dtype = jnp.dtype(config.model.dtype)
  mesh = sharding.make_mesh(cand=config.scorer.mesh_cand or None, model=config.scorer.mesh_model,
                            devices=devices)
  scorer, pool = abstract_scorer(config, cfg, dtype, mesh)
  held_bytes = scorer_held_bytes(scorer)
  programs = {}
  for name, lowered in scorer.lower().items():
    programs[name] = compile_stats(lowered)
    logging.info("compiled %s in %.1f s", name, programs[name]["seconds"])
  compiled = [p for p in programs.values() if "error" not in p]
  resident = sum(held_bytes.values())
  peak = resident + max(new_bytes(p) for p in compiled) if compiled else None
  if len(compiled) < len(programs):
    peak = None  # a program over HBM: the compiler's message says by how much

  lowered, batch, eval_held = lower_evaluation(config, cfg, dtype, mesh, eval_slots)
  evaluation = compile_stats(lowered)
  logging.info("compiled score_slots in %.1f s", evaluation["seconds"])
  eval_resident = sum(eval_held.values())
  eval_peak = None if "error" in evaluation else eval_resident + new_bytes(evaluation)

  # Kept states: one level is every candidate slot of a chip at one sublayer boundary; at most
  # `useful` levels are kept (one every state_every sublayers). The largest
  # scorer.state_memory_gb that leaves the headroom free: with --fit_states, found by compiling
  # the step program at each size tried; else estimated with the rest of the peak unchanged
  # (the step updates the states in place, but its temporaries can grow with them).
  n, t = config.data.num_sequences, config.data.seq_len
  level = scorer.slots_per_device * n * t * cfg.hidden_size * dtype.itemsize
  useful = math.ceil(scorer.num_sublayers / config.scorer.state_every)
  budget = (1 - headroom) * hbm_gib * GIB
  suggestion = None
  if peak is not None:
    room = budget - (peak - held_bytes["kept states"])
    levels = max(0, min(useful, int(room // level)))
    suggestion = {"levels": levels, "useful_levels": useful, "level_bytes": level,
                  "headroom": headroom, "state_memory_gb": state_budget_gb(levels, level),
                  "method": "estimate"}
  if search_states and "error" not in programs["reference"] and "error" not in programs["prefix"]:
    fixed = max(new_bytes(programs["reference"]), new_bytes(programs["prefix"]))
    fit = fit_states(config, cfg, dtype, mesh, fixed, budget, level, useful,
                     {} if peak is None else {scorer.num_states: peak})
    suggestion = {"levels": fit["levels"], "useful_levels": useful, "level_bytes": level,
                  "headroom": headroom, "peak_bytes": fit["peak_bytes"], "fits": fit["fits"],
                  "tried_levels": fit["tried"],
                  "state_memory_gb": state_budget_gb(fit["levels"], level), "method": "compiled"}
  # XLA's cost analysis counts a loop body once and a conditional's costliest branch: per
  # iteration figures. The whole dense passes by the FLOP model, per chip (model axis split):
  attn, ffn, head = sublayer_flops(cfg, n, t)
  split = mesh.shape[sharding.MODEL]
  programs["reference"]["model_flops"] = (cfg.num_layers * (attn + ffn) + head) / split
  attn, ffn, _ = sublayer_flops(cfg, batch["rows"], batch["seq_len"])
  head = 2 * batch["rows"] * batch["slots"] * cfg.hidden_size * cfg.vocab_size
  evaluation["model_flops"] = (cfg.num_layers * (attn + ffn) + head) / split

  gen, chips = parse_topology(topology)
  peaks = [p for p in (peak, eval_peak) if p is not None]
  fits = (peak is not None and eval_peak is not None and max(peaks) <= hbm_gib * GIB)
  return {"model": config.model.path, "dtype": str(dtype), "architecture": cfg.to_dict(),
          "topology": topology, "generation": gen, "chips": chips,
          "device_kind": devices[0].device_kind, "hbm_gib": hbm_gib,
          "mesh": dict(mesh.shape), "replicated_weights": replicated_weights(cfg, mesh),
          "calibration": [n, t], "chunk_width": scorer.chunk_width,
          "position_block": scorer.position_block, "candidates": len(pool),
          "slots_per_device": scorer.slots_per_device,
          "state_memory_gb": config.scorer.state_memory_gb,
          "kept_states": [scorer.num_states, scorer.state_every],
          "held_bytes": held_bytes, "programs": programs, "resident_bytes": resident,
          "peak_bytes": peak, "state_suggestion": suggestion,
          "evaluation": {"batch": batch, "held_bytes": eval_held, "program": evaluation,
                         "resident_bytes": eval_resident, "peak_bytes": eval_peak},
          "max_peak_bytes": max(peaks) if peaks else None,
          "verdict": "fits" if fits else "DOES NOT FIT"}


def report_tpu(r: dict) -> str:
  gib = lambda b: f"{b / GIB:8.2f} GiB"
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  lines = [f"{r['model']} ({r['dtype']}) on TPU {r['topology']}: {r['chips']} chips "
           f"({r['device_kind']}, {r['hbm_gib']:g} GiB HBM each), mesh {mesh}; compiled by the "
           f"TPU compiler, deviceless",
           f"calibration {r['calibration'][0]} x {r['calibration'][1]}, {r['candidates']} "
           f"candidates ({r['slots_per_device']} slots per chip) in chunks of "
           f"{r['chunk_width']}; state_memory_gb={r['state_memory_gb']:g}: kept states "
           f"{r['kept_states'][0]} per candidate (every {r['kept_states'][1]} sublayers)"]
  if r["replicated_weights"]:
    lines.append(f"whole on every chip (the heads do not divide the model axis): "
                 f"{', '.join(r['replicated_weights'])}")

  header = (f"  {'':12s}{'arguments':>13s}{'outputs':>13s}{'aliased':>13s}{'temporaries':>13s}"
            f"{'TFLOP':>9s}{'GB accessed':>13s}{'compile':>9s}")

  def row(name, p):
    if "error" in p:
      return [f"  {name:12s}rejected by the compiler after {p['seconds']:.0f} s: "
              + p["error"].splitlines()[0][:300]]
    return [f"  {name:12s}" + "".join(f"{gib(p[k]):>13s}" for k in
                                      ("arguments", "outputs", "aliased", "temporaries"))
            + f"{p['flops'] / 1e12:9.2f}{p['bytes_accessed'] / 1e9:13.1f}{p['seconds']:8.0f}s"]

  lines += ["", "search: held per chip between programs:"]
  lines += [f"  {name:30s}{gib(b)}" for name, b in r["held_bytes"].items()]
  lines += [f"  {'total':30s}{gib(r['resident_bytes'])}", "",
            "search: compiled programs, per chip (memory_analysis, cost_analysis):", header]
  for name, p in r["programs"].items():
    lines += row(name, p)
  if r["peak_bytes"] is not None:
    lines += [f"search peak per chip (held + largest program's temporaries and new outputs): "
              f"{gib(r['peak_bytes']).strip()}"]
  s = r["state_suggestion"]
  if s is not None and s["method"] == "estimate":
    lines += [f"  one level of kept states is {gib(s['level_bytes']).strip()} per chip; "
              f"{s['levels']} of the {s['useful_levels']} useful levels would fit with "
              f"{s['headroom']:.0%} of HBM left free if the step's temporaries did not grow with "
              f"them (an upper bound; --fit_states checks by compiling): "
              f"--config.scorer.state_memory_gb={s['state_memory_gb']:g}"]
  elif s is not None and not s["fits"]:
    lines += [f"  even without kept states the search leaves less than {s['headroom']:.0%} of "
              f"HBM free"]
  elif s is not None:
    lines += [f"  one level of kept states is {gib(s['level_bytes']).strip()} per chip; by "
              f"compiling the step program with {', '.join(map(str, s['tried_levels']))} levels: "
              f"{s['levels']} of the {s['useful_levels']} useful levels fit with "
              f"{s['headroom']:.0%} of HBM left free (peak {gib(s['peak_bytes']).strip()}): "
              f"--config.scorer.state_memory_gb={s['state_memory_gb']:g}"]

  e = r["evaluation"]
  b = e["batch"]
  lines += ["", f"evaluation (after the search, the scorer freed): the dense model in the pruned "
                f"layout, one batch of {b['rows']} x {b['seq_len']} tokens "
                f"(tokens_per_batch {b['tokens_per_batch']}), {b['slots']} scored slots per row:"]
  lines += [f"  {name:30s}{gib(v)}" for name, v in e["held_bytes"].items()]
  lines += [header] + row("score_slots", e["program"])
  if e["peak_bytes"] is not None:
    lines += [f"evaluation peak per chip: {gib(e['peak_bytes']).strip()}"]

  lines += ["", f"cost analysis counts a loop body once (and a conditional's costliest branch): "
                f"per-iteration figures, not totals. By the FLOP model, per chip: the reference "
                f"pass {r['programs']['reference']['model_flops'] / 1e12:.2f} TFLOP, one "
                f"evaluation batch {e['program']['model_flops'] / 1e12:.2f} TFLOP"]
  figures = []
  for name, peak in (("search", r["peak_bytes"]), ("evaluation", e["peak_bytes"])):
    figures.append(f"{name} {gib(peak).strip()}" if peak is not None else
                   f"{name}: rejected over HBM")
  summary = f"per-chip peak: {', '.join(figures)}; HBM {r['hbm_gib']:g} GiB"
  if r["max_peak_bytes"] is not None:
    summary += f" ({r['max_peak_bytes'] / (r['hbm_gib'] * GIB):.0%} used at the peak)"
  lines += ["", summary, r["verdict"]]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/llama3_70b.py")
  if _TOPOLOGY.value:
    gen, _ = parse_topology(_TOPOLOGY.value)
    if flags.FLAGS["device_memory_gib"].present:
      hbm = _DEVICE_MEMORY.value
    elif gen in HBM_GIB:
      hbm = HBM_GIB[gen]
    else:
      raise app.UsageError(f"no HBM size known for {gen!r}: give --device_memory_gib")
    r = measure_tpu(_CONFIG.value, _TOPOLOGY.value, _EVAL_SLOTS.value, _HEADROOM.value, hbm,
                    _FIT_STATES.value)
    text = report_tpu(r)
  else:
    r = measure(_CONFIG.value, _DEVICES.value)
    text = report(r, _DEVICE_MEMORY.value)
  print(text)
  if _OUT.value:
    atomic_write_json(_OUT.value, r)


if __name__ == "__main__":
  app.run(main)
