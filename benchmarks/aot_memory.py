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
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A job config file (configs/*.py).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (the mesh spans all of them).")
_DEVICE_MEMORY = flags.DEFINE_float("device_memory_gib", 80.0,
                                    "Memory of one accelerator, for the verdict (H100: 80).")
_OUT = flags.DEFINE_string("out", None, "Also write the figures to this JSON file.")

# config.json fields of the paper's models (the meta-llama repositories on the Hugging Face hub),
# keyed by checkpoint directory name.
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
}

GIB = 2**30


def model_config(path: str):
  from finercut_jax import loading
  from finercut_jax.config import LlamaConfig
  if os.path.exists(loading.resolve_path(path)):
    return loading.load_config(loading.resolve_path(path))
  name = os.path.basename(os.path.normpath(path))
  if name not in ARCHITECTURES:
    raise app.UsageError(f"{path} does not exist and is not one of the known architectures "
                         f"{sorted(ARCHITECTURES)}: point model.path at a checkpoint directory")
  arch = ARCHITECTURES[name]
  return LlamaConfig(head_dim=arch["hidden_size"] // arch["num_heads"], **arch)


def per_device_bytes(tree) -> int:
  import jax
  import numpy as np
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def measure(config, devices: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)

  from finercut_jax import sharding
  from finercut_jax.model import param_shapes
  from finercut_jax.scorer import Scorer
  from finercut_jax.search import SearchSpec

  cfg = model_config(config.model.path)
  dtype = jnp.dtype(config.model.dtype)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  mesh = sharding.make_mesh(cand=config.scorer.mesh_cand or None, model=config.scorer.mesh_model)
  tokens = np.zeros((config.data.num_sequences, config.data.seq_len), np.int32)
  pool = SearchSpec(num_layers=cfg.num_layers, pool=config.search.pool).pool_candidates()
  scorer = Scorer(shapes, cfg, tokens, metric=config.search.metric,
                  chunk_width=config.scorer.chunk_width,
                  position_block=config.scorer.position_block, mesh=mesh,
                  max_candidates=len(pool), state_every=config.scorer.state_every,
                  state_memory=config.scorer.state_memory_gb * GIB)
  held = {"params": scorer.params, "prefix cache": scorer.prefix, "kept states": scorer.states,
          "reference": scorer.reference,
          "embeddings, targets, weights": (scorer.h0, scorer.targets, scorer.weights)}
  held_bytes = {name: per_device_bytes(tree) for name, tree in held.items()}
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/llama3_70b.py")
  r = measure(_CONFIG.value, _DEVICES.value)
  print(report(r, _DEVICE_MEMORY.value))
  if _OUT.value:
    from finercut_jax.io import atomic_write_json
    atomic_write_json(_OUT.value, r)


if __name__ == "__main__":
  app.run(main)
