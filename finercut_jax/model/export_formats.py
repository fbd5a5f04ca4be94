"""Pruned models as Hugging Face checkpoints that transformers and vLLM load as they are.

Formats (`FORMATS`):
  llama         Whole blocks removed: the source's architecture (`LlamaForCausalLM`,
                `MistralForCausalLM`, `Qwen2ForCausalLM`, `MixtralForCausalLM`) with fewer
                layers. transformers and vLLM load it with no extra code.
  decilm        Any sublayers removed: vLLM's heterogeneous-block format (`DeciLMForCausalLM`,
                `model_type: "nemotron-nas"`), where `block_configs[i].attention.no_op` /
                `.ffn.no_op` mark a removed sublayer and its weights are absent.
  llama_zeroed  Any sublayers removed, as a plain Llama: a sublayer removed alone is written as
                zero weights, which is exact (its residual branch adds 0) but saves nothing for it.
`auto` picks `llama` when whole blocks alone are removed, else `decilm` (`llama_zeroed` for a
model DeciLM cannot describe: vLLM's DeciLM blocks have no q/k/v biases, experts or sliding
window, so Qwen2, Mixtral and windowed Mistral models with single sublayers removed export as
`llama_zeroed`, in their own architecture). In every format a block whose two sublayers are both
removed is dropped and the layers after it are renumbered.

The `block_configs` fields written are those vLLM's model code reads
(vllm/model_executor/models/nemotron_nas.py, `DeciLMDecoderLayer.__init__`):
  attention.no_op             the attention sublayer (and its `input_layernorm`) is absent
  attention.n_heads_in_group  query heads per KV head: `num_key_value_heads = num_attention_heads
                              // n_heads_in_group`
  ffn.no_op                   the MLP (and its `post_attention_layernorm`) is absent
  ffn.ffn_mult                read first when present: width `int(2 * ffn_mult * hidden / 3)`
                              rounded up to a multiple of 256; written only when that gives the
                              model's width exactly
  ffn.intermediate_size       read when `ffn_mult` is absent
and `replace_with_linear: false` (read by other DeciLM readers). transformers has no DeciLM config
class and vLLM registers none, so the export ships one (`configuration_decilm.py`, a config class
only: model/decilm_config.py) through `auto_map`: serve with `vllm serve DIR --trust-remote-code`.
vLLM's DeciLM layer cannot start with a no-op attention before its first sublayer (its fused
residual norm gets no residual): when the first exported block has no attention, that one
attention is written as zero weights instead, and `finercut_export.json` says so.

Weights are written in the source checkpoint's dtype (its config.json `dtype`; for a GGUF source,
the pruned checkpoint's), one tensor at a time: on several processes every process takes part in
gathering each tensor from its shards and process 0 writes it, so no host ever holds more than one
safetensors file's tensors. The output appears under its final name only when complete.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from finercut_jax.model.architecture import LlamaConfig, decilm_intermediate_size
from finercut_jax.model.checkpoint import load_pruned, read_meta
from finercut_jax.model.loading import HF_TOP_NAMES, hf_layer_names, resolve_path
from finercut_jax.model.modules import ATTN, ATTN_PARAM_NAMES, FFN, Llama
from finercut_jax.parallel import distributed
from finercut_jax.rundir import RunDir
from finercut_jax.rundir.atomic import atomic_write_json, read_json


class ExportFormat(enum.StrEnum):
  AUTO = "auto"
  LLAMA = "llama"
  DECILM = "decilm"
  LLAMA_ZEROED = "llama_zeroed"


FORMATS = tuple(f.value for f in ExportFormat)
WEIGHTS, NO_OP, ZERO = "weights", "no_op", "zero"
_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' classic max_shard_size="5GB"
_DECILM_CONFIG_FILE = "configuration_decilm.py"
# Fields that list one value per layer are cut to the kept blocks; these lists are not per layer.
_NOT_PER_LAYER = ("architectures",)


class ExportError(ValueError):
  """The pruned model cannot be written as asked (format, output directory)."""


@dataclasses.dataclass(frozen=True)
class ExportedLayer:
  block: int  # the source model's block
  attention: str  # WEIGHTS, NO_OP or ZERO
  ffn: str


def decilm_refusal(cfg: LlamaConfig) -> str | None:
  """Why vLLM's DeciLM format cannot hold this architecture, or None when it can."""
  if cfg.is_moe or cfg.qkv_bias or cfg.sliding_window is not None:
    what = ("mixture-of-experts FFNs" if cfg.is_moe else "q/k/v biases" if cfg.qkv_bias
            else f"a sliding window ({cfg.sliding_window})")
    return f"a {cfg.model_type} model has {what}, which vLLM's DeciLM blocks do not"
  return None


def layer_plan(keep: np.ndarray, fmt: ExportFormat | str, cfg: LlamaConfig
               ) -> tuple[ExportFormat, list[ExportedLayer]]:
  """The format `fmt` resolves to (`auto` chosen) and what each exported layer holds, for the
  sublayers bool `keep` `[L, 2]` keeps; `cfg`, the architecture, decides whether DeciLM can hold
  it."""
  keep = np.asarray(keep, bool)
  if fmt not in FORMATS:
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
  fmt = ExportFormat(fmt)
  alone = [(l, k) for l in range(len(keep)) for k in (ATTN, FFN)
           if not keep[l, k] and keep[l, 1 - k]]
  refusal = decilm_refusal(cfg)
  if fmt is ExportFormat.AUTO:
    fmt = ((ExportFormat.LLAMA_ZEROED if refusal else ExportFormat.DECILM) if alone
           else ExportFormat.LLAMA)
  if fmt is ExportFormat.DECILM and refusal:
    raise ExportError(f"--format=decilm: {refusal}; use --format=llama_zeroed (removed "
                      f"sublayers as zero weights, in the source's architecture)")
  if fmt is ExportFormat.LLAMA and alone:
    names = ", ".join(f"{('attention', 'ffn')[k]} of block {l}" for l, k in alone[:4])
    raise ExportError(
        f"--format=llama holds whole blocks only, and {len(alone)} sublayers are removed alone "
        f"({names}{', ...' if len(alone) > 4 else ''}); use --format=decilm (no-op sublayers, "
        f"served by vLLM) or --format=llama_zeroed (a plain Llama with those sublayers as zeros)")
  absent = NO_OP if fmt is ExportFormat.DECILM else ZERO
  rows = [ExportedLayer(l, WEIGHTS if keep[l, ATTN] else absent,
                        WEIGHTS if keep[l, FFN] else absent)
          for l in range(len(keep)) if keep[l].any()]
  if fmt is ExportFormat.DECILM and rows and rows[0].attention == NO_OP:
    rows[0] = dataclasses.replace(rows[0], attention=ZERO)  # see the module docstring
  return fmt, rows


# ----------------------------------------------------------------------------- config.json


def exported_config(base: dict, model: Llama, rows: list[ExportedLayer],
                    fmt: ExportFormat, dtype: str) -> dict:
  """The exported `config.json`: the source's, with the layer count, every per-layer list and
  the dtype made to match the exported layers (and the DeciLM fields for `decilm`)."""
  cfg = model.config
  out = {k: v for k, v in base.items()
         if k not in ("_name_or_path", "transformers_version", "auto_map", "block_configs")}
  for key, value in base.items():
    if isinstance(value, list) and len(value) == cfg.num_layers and key not in _NOT_PER_LAYER:
      out[key] = [value[r.block] for r in rows]
  out["num_hidden_layers"] = len(rows)
  out["dtype"] = dtype
  if "torch_dtype" in out:
    out["torch_dtype"] = dtype
  if fmt is not ExportFormat.DECILM:
    return out
  ffn = {"no_op": False, "replace_with_linear": False, "intermediate_size": cfg.intermediate_size}
  ffn_mult = cfg.intermediate_size * 3 / (2 * cfg.hidden_size)
  if decilm_intermediate_size({"ffn_mult": ffn_mult}, cfg.hidden_size) == cfg.intermediate_size:
    ffn["ffn_mult"] = ffn_mult
  group = cfg.num_heads // cfg.num_kv_heads
  out.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
             auto_map={"AutoConfig": f"{_DECILM_CONFIG_FILE[:-3]}.DeciLMConfig"},
             block_configs=[{
                 "attention": {"no_op": r.attention == NO_OP, "replace_with_linear": False,
                               "n_heads_in_group": None if r.attention == NO_OP else group},
                 "ffn": dict(ffn, no_op=True) if r.ffn == NO_OP else dict(ffn)}
                 for r in rows])
  return out


def _source_dir(source: str | None) -> str | None:
  """The source checkpoint's directory when it is a Hugging Face directory still on disk (not a
  GGUF file): its config.json and generation_config.json are the export's starting point."""
  path = resolve_path(source) if source else None
  return path if path and os.path.isdir(path) else None


# ----------------------------------------------------------------------------- weights


def _tensors(model: Llama, rows: list[ExportedLayer], dtype):
  """`(Hugging Face name, shape, fetch)` for every exported tensor, in file order; `fetch()` is
  that tensor as a host array in the Hugging Face layout (every process calls it)."""
  params = model.params()
  stacks = {**params["layers"]} if "layers" in params else {**params["attn"], **params["ffn"]}
  index = model.layers.stack_index.reshape(-1, 2)  # [L, 2]: each sublayer's stack row
  layer_names = hf_layer_names(model.config)

  def fetch(x, transpose):
    host = distributed.gather(x.astype(dtype))
    return np.ascontiguousarray(host.T if transpose else host)

  def entry(name, transpose, shape, get):
    shape = tuple(reversed(shape)) if transpose else tuple(shape)
    return name, shape, lambda: fetch(get(), transpose)

  name, t = HF_TOP_NAMES["embed"]
  out = [entry(name, t, params["embed"].shape, lambda: params["embed"])]
  for i, row in enumerate(rows):
    for ours, (suffix, t) in layer_names.items():
      kind = ATTN if ours in ATTN_PARAM_NAMES else FFN
      mode = row.attention if kind == ATTN else row.ffn
      if mode == NO_OP:
        continue
      stack, r = stacks[ours], int(index[row.block, kind])
      name = f"model.layers.{i}.{suffix}"
      # A mixture's expert weights: one tensor per expert ({e} in the name).
      parts = ([(name.format(e=e), (r, e)) for e in range(stack.shape[1])] if "{e}" in suffix
               else [(name, (r,))])
      for part, at in parts:
        shape = stack.shape[len(at):]
        get = ((lambda s=stack, at=at: s[at]) if mode == WEIGHTS
               else (lambda s=stack, shape=shape: jnp.zeros(shape, s.dtype)))
        out.append(entry(part, t, shape, get))
  for ours in ("final_norm", "lm_head"):
    if ours in params:
      name, t = HF_TOP_NAMES[ours]
      out.append(entry(name, t, params[ours].shape, lambda p=params[ours]: p))
  return out


def _write_weights(directory: str | None, tensors, dtype, max_shard_bytes: int) -> None:
  """The safetensors files (sharded with an index past `max_shard_bytes`); `directory` is None
  on the processes that only help gather."""
  itemsize = jnp.dtype(dtype).itemsize
  files, size = [[]], 0
  for t in tensors:
    nbytes = int(np.prod(t[1])) * itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(t)
    size += nbytes
  names = (["model.safetensors"] if len(files) == 1 else
           [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
  total = 0
  for fname, group in zip(names, files):
    arrays = {}
    for name, shape, fetch in group:
      array = fetch()  # every process takes part; the others drop their copy at once
      assert array.shape == shape, (name, array.shape, shape)
      total += array.nbytes
      if directory is not None:
        arrays[name] = array
    if directory is not None:
      safetensors.numpy.save_file(arrays, os.path.join(directory, fname),
                                  metadata={"format": "pt"})
    del arrays
  if directory is not None and len(files) > 1:
    atomic_write_json(os.path.join(directory, "model.safetensors.index.json"), {
        "metadata": {"total_size": total},
        "weight_map": {t[0]: fname for fname, group in zip(names, files) for t in group}})


# ----------------------------------------------------------------------------- public


def check_output_dir(out: str) -> None:
  """Refuses an output path that exists and is not an empty directory."""
  if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise ExportError(f"{out} exists and is not empty: choose a new output directory (nothing "
                      f"is overwritten)")


def export_model(model: Llama, out: str, *, keep: np.ndarray | None = None,
                 fmt: ExportFormat | str = ExportFormat.AUTO,
                 dtype=None, tokenizer=None, source: str | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, provenance: dict | None = None
                 ) -> str:
  """Writes `model` (a pruned `Llama`; bool `keep` `[L, 2]` defaults to the sublayers it holds,
  and may remove more of them) to the new directory `out` as a Hugging Face checkpoint in format
  `fmt`; `source` is the checkpoint it was pruned from (its config.json and
  generation_config.json are the starting point). Every process of a multi-process job calls it;
  process 0 writes. Returns the format written."""
  out = os.path.abspath(out)
  keep = model.present if keep is None else np.asarray(keep, bool) & model.present
  fmt, rows = layer_plan(keep, fmt, model.config)
  distributed.on_primary(lambda: check_output_dir(out))
  model = model.prune(keep)
  source_dir = _source_dir(source)
  source_config = read_json(os.path.join(source_dir, "config.json")) if source_dir else None
  # The dtype the source stores (its config.json's), else the checkpoint's (a GGUF source).
  dtype = (dtype or (source_config or {}).get("dtype") or (source_config or {}).get("torch_dtype")
           or model.params()["embed"].dtype)
  if (dtype if isinstance(dtype, str) else jnp.dtype(dtype).name) not in _DTYPES:
    raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
  dtype = jnp.dtype(dtype)
  # A GGUF source (or a source no longer on disk, or a DeciLM one): built from the model.
  base = (source_config if source_config and source_config.get("model_type", "llama") ==
          model.config.model_type else model.config.to_hf())
  config = exported_config(base, model, rows, fmt, dtype.name)
  if tokenizer is not None:  # a config built from a GGUF source has no special token ids
    config.setdefault("bos_token_id", tokenizer.bos_token_id)
    config.setdefault("eos_token_id", tokenizer.eos_token_id)
  tensors = _tensors(model, rows, dtype)
  primary = distributed.is_primary()
  tmp = distributed.on_primary(lambda: tempfile.mkdtemp(
      prefix=".tmp-" + os.path.basename(out), dir=os.path.dirname(out) or "."))
  try:
    _write_weights(tmp if primary else None, tensors, dtype, max_shard_bytes)
    distributed.on_primary(lambda: _write_metadata(
        tmp, config, fmt, rows, keep, dtype, tokenizer, source, source_dir, provenance))
    distributed.on_primary(lambda: _publish(tmp, out))
  finally:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
  return fmt


def _write_metadata(directory, config, fmt, rows, keep, dtype, tokenizer, source, source_dir,
                    provenance):
  from transformers import GenerationConfig  # lazy: importing transformers takes ~0.5 s
  atomic_write_json(os.path.join(directory, "config.json"), config)
  if fmt is ExportFormat.DECILM:
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "decilm_config.py"),
                    os.path.join(directory, _DECILM_CONFIG_FILE))
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  generation = os.path.join(source_dir, "generation_config.json") if source_dir else None
  if generation and os.path.isfile(generation):
    shutil.copyfile(generation, os.path.join(directory, "generation_config.json"))
  elif tokenizer is not None:
    GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(directory)
  atomic_write_json(os.path.join(directory, "finercut_export.json"), dict(
      provenance or {}, source=source, format=fmt, dtype=dtype.name, keep=keep.tolist(),
      blocks=[r.block for r in rows],
      zeroed=[f"{kind} of block {r.block}" for r in rows for kind, mode in
              (("attention", r.attention), ("ffn", r.ffn)) if mode == ZERO]))


def _publish(tmp: str, out: str) -> None:
  check_output_dir(out)
  if os.path.isdir(out):
    os.rmdir(out)  # empty: replaced by the complete export
  os.replace(tmp, out)


def export_pruned(run_dir: str, ratio: float, out: str, *,
                  fmt: ExportFormat | str = ExportFormat.AUTO, dtype=None,
                  healed: bool = False, mesh=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES
                  ) -> str:
  """Exports the pruned (or healed) model of a run at `ratio` to `out`; returns the format."""
  distributed.on_primary(lambda: check_output_dir(os.path.abspath(out)))
  run = RunDir(run_dir)
  meta = read_meta(run.checkpoint_dir(ratio, healed=healed)) or {}
  model, tokenizer = load_pruned(run_dir, ratio, healed=healed, mesh=mesh)
  return export_model(model, out, fmt=fmt, dtype=dtype, tokenizer=tokenizer,
                      source=meta.get("source"), max_shard_bytes=max_shard_bytes,
                      provenance={"run_dir": os.path.abspath(run_dir), "ratio": ratio,
                                  "checkpoint": os.path.basename(
                                      run.checkpoint_group(healed=healed))})
