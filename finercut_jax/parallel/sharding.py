"""The device mesh and where every array lives on it, declared once as logical-axis rules.

The mesh has two axes: `cand` splits the removal candidates (data parallelism over masks) and
`model` splits the weights (tensor parallelism, for models that do not fit one device).
Parameters are replicated over `cand`. A parameter dimension is named by a logical axis; `RULES`
maps logical axes to mesh axes. A dimension that the mesh axis does not divide stays replicated
(e.g. 3 KV heads on a 4-way model axis), so any mesh shape runs.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

CAND, MODEL = "cand", "model"

# Megatron-style tensor parallelism: heads and FFN hidden units split, the residual stream whole.
# A mixture's experts are split the same way (each expert's FFN units over the model axis, every
# device holding a slice of every expert), so routing needs no all-to-all: the dense-masked
# dispatch of `model.Experts` runs every expert on every token anyway.
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


def param_sharding_fn(mesh: Mesh, cfg):
  """`sharding_fn(name, shape)` for `loading.load_params`: a checkpoint-layout parameter placed by
  the logical axes the model declares for it (`model.logical_axes`)."""
  from finercut_jax.model.modules import logical_axes
  axes, units = logical_axes(cfg), _head_units(cfg)

  def fn(name, shape):
    return NamedSharding(mesh, logical_spec(axes[name], shape, mesh, units))
  return fn


def _place(x, sharding):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.device_put(x, sharding)


def shard_params(params, mesh: Mesh, cfg):
  """Places a checkpoint-layout parameter pytree on the mesh according to `RULES`; abstract
  leaves (`jax.ShapeDtypeStruct`) get the sharding attached instead."""
  fn = param_sharding_fn(mesh, cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _place(x, fn(path[-1].key, x.shape)), params)


def state_shardings(state, mesh: Mesh, cfg):
  """The `NamedSharding` of every variable of an `nnx.State`, from the logical axes each one
  carries (`out_sharding` metadata); a variable without them is replicated."""
  from flax import nnx
  units = _head_units(cfg)

  def spec(var):
    axes = var.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_spec(axes, var.shape, mesh, units) if axes else P())

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, cfg):
  """An `nnx.State` (of a `Llama`) placed on the mesh by its variables' logical axes; abstract
  leaves get the sharding attached instead."""
  from flax import nnx
  return jax.tree.map(lambda var, sharding: var.replace(_place(var.get_value(), sharding)), state,
                      state_shardings(state, mesh, cfg),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_chunks_per_device(num_candidates: int, width: int, cand_devices: int) -> int:
  """Chunks of `width` candidates each device runs so that all candidates fit."""
  return max(1, math.ceil(num_candidates / (width * cand_devices)))
