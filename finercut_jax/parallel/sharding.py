"""The device mesh and where every array lives on it, declared once as logical-axis rules.

The mesh has two axes: `cand` splits the removal candidates (data parallelism over masks) and
`model` splits the weights (tensor parallelism, for models that do not fit one device).
Parameters are replicated over `cand`. A parameter dimension is named by a logical axis; `RULES`
maps logical axes to mesh axes. A dimension that the mesh axis does not divide stays replicated
(e.g. 3 KV heads on a 4-way model axis), so any mesh shape runs.

One rule (`logical_sharding`) turns a parameter's logical axes and shape into its sharding, and
one function places parameters by it: `shard_state`, for the `nnx.State` of a `Llama`, whose
variables carry their logical axes (model/modules.py declares them). The loaders, which read
checkpoint tensors straight into sharded device arrays before any module exists, ask the same
rule through `param_sharding_fn`, by the logical axes the model declares for each checkpoint
name (`modules.logical_axes`).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from finercut_jax.model.modules import logical_axes

CAND, MODEL = "cand", "model"

# Megatron-style tensor parallelism: heads and FFN hidden units split, the residual stream whole.
# A mixture's experts are split the same way (each expert's FFN units over the model axis, every
# device holding a slice of every expert), so routing needs no all-to-all: the dense-masked
# dispatch of `modules.Experts` runs every expert on every token anyway.
RULES = {"q_heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "vocab": MODEL,
         "embed": None, "layers": None, "experts": None}


def make_mesh(cand: int | None = None, model: int = 1, devices=None) -> Mesh:
  """A `(cand, model)` mesh over `devices` (all devices of all processes by default); `cand=None`
  uses all that remain. Over every device, JAX orders them by the physical topology (TPU ICI
  rings, GPU hosts), so the model axis stays on neighbouring chips and, where it fits, one host."""
  devices = list(devices if devices is not None else jax.devices())
  if model < 1 or len(devices) % model:
    raise ValueError(f"the mesh's model axis {model} (scorer.mesh_model) does not divide the "
                     f"{len(devices)} devices of this job ({jax.process_count()} process(es)); "
                     f"run on a multiple of {model} devices or set --config.scorer.mesh_model")
  cand = cand or len(devices) // model
  if cand * model > len(devices):
    raise ValueError(f"mesh {cand}x{model} (scorer.mesh_cand x scorer.mesh_model) needs "
                     f"{cand * model} devices, this job has {len(devices)}")
  axis_types = (AxisType.Auto, AxisType.Auto)
  if cand * model == len(devices):
    return jax.make_mesh((cand, model), (CAND, MODEL), axis_types, devices=devices)
  grid = np.asarray(devices[:cand * model]).reshape(cand, model)
  return Mesh(grid, (CAND, MODEL), axis_types=axis_types)


def logical_spec(axes, shape, mesh: Mesh, units: dict | None = None) -> P:
  """PartitionSpec for a tensor with the given logical axes, replicating what does not divide.

  `units` gives, for axes such as heads, how many indivisible units a dimension holds (a head is
  never split across devices): the mesh axis must divide the unit count, not just the size.
  """
  units = units or {}
  spec = []
  for name, size in zip(axes, shape):
    mesh_axis = RULES.get(name)
    if mesh_axis is not None and units.get(name, size) % mesh.shape[mesh_axis] == 0:
      spec.append(mesh_axis)
    else:
      spec.append(None)
  return P(*spec)


def _head_units(cfg) -> dict:
  """Heads are never split across devices: a mesh axis must divide the head count."""
  return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}


def logical_sharding(axes, shape, mesh: Mesh, cfg) -> NamedSharding:
  """Where a parameter of `cfg`'s model with logical `axes` and `shape` lives on `mesh`
  (`logical_spec`, heads kept whole); replicated when it has no axes."""
  return NamedSharding(mesh, logical_spec(axes, shape, mesh, _head_units(cfg)) if axes else P())


def state_shardings(state, mesh: Mesh, cfg):
  """The `NamedSharding` of every variable of an `nnx.State`, from the logical axes each one
  carries (`out_sharding` metadata); a variable without them is replicated."""
  return jax.tree.map(
      lambda var: logical_sharding(var.get_metadata().get("out_sharding"), var.shape, mesh, cfg),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _place(x, sharding):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.device_put(x, sharding)


def shard_state(state, mesh: Mesh, cfg):
  """An `nnx.State` (of a `Llama`, or part of one) placed on the mesh by its variables' logical
  axes (`state_shardings`); abstract leaves (`jax.ShapeDtypeStruct`) get the sharding attached
  instead. The one function that places parameters on a mesh."""
  return jax.tree.map(lambda var, sharding: var.replace(_place(var.get_value(), sharding)), state,
                      state_shardings(state, mesh, cfg),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_sharding_fn(mesh: Mesh, cfg):
  """`sharding_fn(name, shape)` for the loaders (`loading.load_params`, `loading.load_model`):
  the sharding of a checkpoint-layout tensor `name` of `shape` (e.g. a stack over the present
  sublayers only), by the logical axes of the model variable it loads into
  (`modules.logical_axes`): what `shard_state` gives that variable."""
  axes = logical_axes(cfg)
  return lambda name, shape: logical_sharding(axes[name], shape, mesh, cfg)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
