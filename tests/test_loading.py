"""Loading checkpoints: sharded and bf16 safetensors, GGUF, the default model, the tokenizer cache,
and clear errors for what cannot be loaded.

References are independent of the loader: transformers' PyTorch LlamaForCausalLM (for safetensors
and hand-written GGUF files) and transformers' own GGUF loader (for the default model).
"""
import functools
import json
import os
import pickle
import shutil
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import finercut_jax
from finercut_jax import CheckpointError, UnsupportedConfigError, load_model, load_params
from finercut_jax.model import loading
from finercut_jax.model.modules import forward
from hf_tiny import edit_config, hf_logits, make_hf_model, save_hf_model, write_gguf

# float32 parity tolerance: see test_model.py (logits O(1), measured differences <= ~2e-5).
ATOL = 1e-4
BATCH, SEQ = 2, 24
fwd = jax.jit(forward, static_argnums=1)


def tokens_for(hf, seed=0):
  return np.random.RandomState(seed).randint(0, hf.config.vocab_size, (BATCH, SEQ))


def assert_params_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  """An untied tiny model (so lm_head is a separate, transposed tensor), saved once."""
  hf = make_hf_model("single_kv", seed=3)
  return hf, save_hf_model(hf, tmp_path_factory.mktemp("untied"))


# ----------------------------------------------------------------------------- safetensors


def test_sharded_checkpoint_loads_identically(untied, tmp_path):
  hf, single_dir = untied
  sharded_dir = str(tmp_path / "sharded")
  hf.save_pretrained(sharded_dir, max_shard_size="40KB")
  files = os.listdir(sharded_dir)
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  with open(os.path.join(sharded_dir, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 2  # really sharded
  _, single = load_params(single_dir)
  cfg, sharded = load_params(sharded_dir)
  assert_params_equal(sharded, single)
  tokens = tokens_for(hf)
  np.testing.assert_allclose(np.asarray(fwd(sharded, cfg, jnp.asarray(tokens))),
                             hf_logits(hf, tokens), rtol=0, atol=ATOL)


def test_load_into_sharded_device_arrays(untied):
  """sharding_fn places each tensor on a 2x4 mesh of the 8 simulated devices; each device shard
  is read from the file on its own (partial, transposed slices): the values must not change."""
  hf, directory = untied
  assert len(jax.devices()) >= 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  P = jax.sharding.PartitionSpec

  def sharding_fn(name, shape):
    spec, free = [None] * len(shape), {"b": 4, "a": 2}
    for dim in reversed(range(len(shape))):  # shard the trailing dims that divide evenly
      for axis, size in list(free.items()):
        if shape[dim] % size == 0:
          spec[dim] = axis
          del free[axis]
          break
    return jax.sharding.NamedSharding(mesh, P(*spec))

  _, reference = load_params(directory)
  cfg, params = load_params(directory, sharding_fn=sharding_fn)
  assert_params_equal(params, reference)
  # The layout really is sharded, transposed tensors included.
  assert params["layers"]["wq"].sharding.spec == P(None, "a", "b")
  assert params["lm_head"].sharding.spec == P("b", None)  # [D=64, V=97]
  assert len({s.device for s in params["lm_head"].addressable_shards}) == 8
  assert params["lm_head"].addressable_shards[1].data.shape == (16, cfg.vocab_size)


def test_bf16_checkpoint(untied, tmp_path):
  hf32, _ = untied
  hf = make_hf_model("single_kv", seed=3).to(torch.bfloat16)
  directory = save_hf_model(hf, tmp_path / "bf16")
  cfg, params = load_params(directory, dtype=jnp.bfloat16)
  # Loading is exact: every weight is bit-identical to the torch bf16 weight.
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  assert params["embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params["embed"], np.float32),
                                sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["layers"]["wk"][2], np.float32),
                                sd["model.layers.2.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(params["lm_head"], np.float32), sd["lm_head.weight"].T)
  # Logits: both sides compute in bf16 but round intermediates at different points (torch rounds
  # every op's output, XLA fuses and keeps some in f32), so they differ by bf16 noise, not 1e-4.
  # bf16 has 8 significant bits (relative 2^-9 = 0.2% per rounding); through 3 layers onto
  # logits of magnitude ~3 the measured difference is ~0.03-0.06 (about the same as each side's
  # distance to the fp32 logits). 0.15 passes that with margin and still catches a real error
  # (a wrong weight or layout moves the logits by O(1)).
  tokens = tokens_for(hf)
  ref = hf_logits(hf, tokens)
  out = np.asarray(fwd(params, cfg, jnp.asarray(tokens)))
  fp32 = hf_logits(hf.float(), tokens)  # same (bf16-rounded) weights, fp32 arithmetic
  # Measured: |jax-torch| 0.051, |jax-fp32| 0.030, |torch-fp32| 0.047.
  np.testing.assert_allclose(out, ref, rtol=0, atol=0.15)
  assert np.abs(out - fp32).max() <= 0.15
  # The checkpoint really holds rounded weights (its fp32 logits differ from the fp32 model's).
  assert np.abs(hf_logits(hf32, tokens) - fp32).max() > 1e-3


# ----------------------------------------------------------------------------- clear errors


def _edit_tensors(directory, edit):
  path = os.path.join(directory, "model.safetensors")
  with safetensors.safe_open(path, "np") as f:
    metadata = f.metadata()
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata=metadata)


def _set(key, value):
  return lambda cfg: cfg.__setitem__(key, value)


def _yarn(cfg):
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 32}


def _rm(name):
  return lambda directory: os.remove(os.path.join(directory, name))


def _wrong_shape(t):
  t["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)


def _extra(t):
  t["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)


def _missing(t):
  del t["model.layers.2.post_attention_layernorm.weight"]


ERRORS = {
    # case: (edit of a copy of the saved checkpoint, error type, regex the message must match)
    "missing_directory": (lambda d: shutil.rmtree(d), CheckpointError,
                          r"/ckpt: no such checkpoint directory"),
    "missing_config": (_rm("config.json"), CheckpointError, r"/ckpt/config\.json is missing"),
    "missing_safetensors": (_rm("model.safetensors"), CheckpointError,
                            r"/ckpt: no model\.safetensors or model\.safetensors\.index\.json"),
    "wrong_shape": (lambda d: _edit_tensors(d, _wrong_shape), CheckpointError,
                    r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \(95, 64\), "
                    r"config\.json implies \(96, 64\)"),
    "unknown_tensor": (lambda d: _edit_tensors(d, _extra), CheckpointError,
                       r"unknown tensors \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"),
    "missing_tensor": (lambda d: _edit_tensors(d, _missing), CheckpointError,
                       r"tensor model\.layers\.2\.post_attention_layernorm\.weight is missing"),
    "rope_yarn": (lambda d: edit_config(d, _yarn), UnsupportedConfigError,
                  r"config\.json: unsupported config field rope_type='yarn'"),
    "attention_bias": (lambda d: edit_config(d, _set("attention_bias", True)),
                       UnsupportedConfigError, r"config\.json: .*field attention_bias=True"),
    "mlp_bias": (lambda d: edit_config(d, _set("mlp_bias", True)), UnsupportedConfigError,
                 r"config\.json: .*field mlp_bias=True"),
    "sliding_window": (lambda d: edit_config(d, _set("sliding_window", 4096)),
                       UnsupportedConfigError, r"config\.json: .*field sliding_window=4096"),
    "hidden_act": (lambda d: edit_config(d, _set("hidden_act", "gelu")), UnsupportedConfigError,
                   r"config\.json: .*field hidden_act='gelu'"),
    "model_type": (lambda d: edit_config(d, _set("model_type", "gpt2")), UnsupportedConfigError,
                   r"config\.json: .*field model_type='gpt2'"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_clear_errors(untied, tmp_path, case):
  _, saved = untied
  directory = str(tmp_path / "ckpt")
  shutil.copytree(saved, directory)
  edit, error, message = ERRORS[case]
  edit(directory)
  with pytest.raises(error, match=message) as info:
    load_model(directory, tokenizer=False)
  assert directory in str(info.value)  # the message names the checkpoint


def test_clear_error_missing_shard(untied, tmp_path):
  hf, _ = untied
  directory = str(tmp_path / "sharded")
  hf.save_pretrained(directory, max_shard_size="40KB")
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(directory, shard))
  with pytest.raises(CheckpointError, match=f"{shard}: listed in the index but missing"):
    load_model(directory, tokenizer=False)


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("name,overrides", [
    ("gqa_tied", {}),                   # tied, GQA, head_dim = hidden / heads
    ("single_kv", {"head_dim": 24}),    # untied, one KV head, explicit head_dim
])
def test_gguf_matches_transformers(tmp_path, name, overrides):
  hf = make_hf_model(name, seed=5, **overrides)
  path = write_gguf(hf, tmp_path / "tiny.gguf")
  cfg, params = load_params(path)
  c = hf.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (
      c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      c.num_attention_heads, c.num_key_value_heads, c.head_dim)
  assert cfg.tie_embeddings == c.tie_word_embeddings
  assert cfg.rms_norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)
  tokens = tokens_for(hf)
  ref = hf_logits(hf, tokens)
  out = np.asarray(fwd(params, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
  # q/k really are un-permuted (the model output alone would also catch it; this names it).
  np.testing.assert_array_equal(np.asarray(params["layers"]["wk"][1]),
                                hf.model.layers[1].self_attn.k_proj.weight.detach().numpy().T)


GGUF_ERRORS = {
    # Llama-3.1 RoPE scaling is stored as this tensor: it must not be silently ignored.
    "rope_freqs": (dict(extra={"rope_freqs.weight": np.ones(8, np.float32)}),
                   r"tiny\.gguf: unknown tensors \['rope_freqs\.weight'\]"),
    "missing_tensor": (dict(drop=("blk.1.ffn_up.weight",)),
                       r"tiny\.gguf: tensor blk\.1\.ffn_up\.weight is missing"),
    "missing_embedding": (dict(drop=("token_embd.weight",)),
                          r"tiny\.gguf: tensor token_embd\.weight is missing"),
    "missing_metadata": (dict(skip_keys=("llama.block_count",)),
                         r"tiny\.gguf: metadata llama\.block_count is missing"),
    "partial_rotary": (dict(extra_keys={"llama.rope.dimension_count": ("uint32", 8)}),
                       r"tiny\.gguf: unsupported metadata llama\.rope\.dimension_count=8"),
    "sliding_window": (dict(extra_keys={"llama.attention.sliding_window": ("uint32", 16)}),
                       r"tiny\.gguf: unsupported metadata llama\.attention\.sliding_window"),
}


@pytest.mark.parametrize("case", sorted(GGUF_ERRORS))
def test_gguf_clear_errors(untied, tmp_path, case):
  hf, _ = untied
  kwargs, message = GGUF_ERRORS[case]
  path = write_gguf(hf, tmp_path / "tiny.gguf", **kwargs)
  with pytest.raises(CheckpointError, match=message):
    load_params(path)


def test_gguf_missing_file(tmp_path):
  with pytest.raises(CheckpointError, match=r"/nope\.gguf: no such GGUF file"):
    load_params(str(tmp_path / "nope.gguf"))


# ----------------------------------------------------------------------------- the default model

PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills, while the children watched from the bridge as "
    "broken branches drifted past. By noon the rain had stopped, and the sun came out over the "
    "flooded valley.")


@pytest.fixture
def faster_transformers_gguf(monkeypatch):
  """transformers' GGUF loading takes ~30 s here: it parses the file (~5 s, mostly the vocabulary
  metadata) twice, and rebuilds gguf's tensor-name table (~10 ms) once per tensor (~400 times).
  Both are pure functions of their arguments over a read-only file: memoizing them changes
  nothing but the time (~12 s)."""
  monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
  monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))


def test_default_model_matches_transformers_gguf(smollm2, faster_transformers_gguf):
  model, tok = smollm2
  path = loading.resolve_default_model()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  ids = np.asarray([tok(PASSAGE)["input_ids"]])
  assert ids.shape[1] > 40
  ref = hf_logits(hf, ids)
  out = np.asarray(model(jnp.asarray(ids)))
  # Both dequantize the same Q4_1 weights exactly; what remains is float32 arithmetic over 30
  # layers on logits of magnitude ~30 (relative 3e-5: measured max ~1.5e-4).
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3)
  # The passage is predicted well (a random or broken model would be near log(49152) = 10.8).
  logp = jax.nn.log_softmax(out[0, :-1])
  nll = -np.mean(np.take_along_axis(np.asarray(logp), ids[0, 1:, None], -1))
  assert nll < 4.0, nll


def test_default_model_greedy_continuation(smollm2):
  model, tok = smollm2
  prompt = tok("The capital of France is")["input_ids"]
  steps = 8
  # A fixed-length buffer: causal attention makes the logits at position i independent of the
  # (padding) tokens after it, so one compiled shape serves every step.
  buf = np.zeros((1, len(prompt) + steps), np.int32)
  buf[0, :len(prompt)] = prompt
  step = jax.jit(lambda params, t: forward(params, model.config, t))
  params = model.params()
  for n in range(len(prompt), len(prompt) + steps):
    logits = step(params, jnp.asarray(buf))
    buf[0, n] = int(jnp.argmax(logits[0, n - 1]))
  text = tok.decode(buf[0, len(prompt):])
  assert "Paris" in text, text


# ----------------------------------------------------------------------------- tokenizer cache


TOKENIZER_TEXTS = [
    PASSAGE,
    "In 1984 there were 366 days; 3.14159 x 2 = 6.28318, 1,234,567 != 1234567, and 0x1F is 31.",
    "Naïve café, Ελληνικά, 日本語のテキスト, emoji 🤖👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧.",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces  between\twords",
    "line one\nline two\n\n\nline five\r\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "",
]

# As if torch were not installed (transformers finds no torch, and importing it raises ImportError):
# converts the GGUF tokenizer through load_tokenizer, reads it back from the cache, and hands the
# converted tokenizer back pickled.
_CONVERT_WITHOUT_TORCH = """
import pickle, sys
sys.modules["torch"] = None
import finercut_jax
tok = finercut_jax.load_tokenizer(sys.argv[1])
finercut_jax.load_tokenizer(sys.argv[1])
with open(sys.argv[2], "wb") as f:
  pickle.dump(tok, f)
"""


def test_gguf_tokenizer_matches_transformers_without_torch(tmp_path, monkeypatch):
  """Our GGUF tokenizer conversion (gguf's reader, not transformers', which imports torch) needs
  no torch, and gives the tokenizer transformers' AutoTokenizer builds from the same file."""
  monkeypatch.setenv("FINERCUT_CACHE", str(tmp_path / "cache"))  # empty: a real conversion
  path = loading.resolve_default_model()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
  subprocess.run([sys.executable, "-c", _CONVERT_WITHOUT_TORCH, path, str(tmp_path / "tok.pkl")],
                 env=env, check=True)
  assert os.path.isdir(loading.tokenizer_cache_dir(path))  # it converted and cached, in tmp_path
  with open(tmp_path / "tok.pkl", "rb") as f:
    ours = pickle.load(f)

  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                      local_files_only=True)
  assert type(ours) is type(ref)
  assert len(ours) == len(ref) == 49152
  assert ours.get_vocab() == ref.get_vocab()
  assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
  for name in ("bos", "eos", "unk", "pad"):
    assert getattr(ours, name + "_token") == getattr(ref, name + "_token"), name
    assert getattr(ours, name + "_token_id") == getattr(ref, name + "_token_id"), name
  assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id,
          ours.pad_token_id) == (1, 2, 0, 2)
  assert ours.add_bos_token == ref.add_bos_token
  assert ours.added_tokens_decoder == ref.added_tokens_decoder
  assert ours.all_special_ids == ref.all_special_ids
  assert ours.chat_template == ref.chat_template
  for text in TOKENIZER_TEXTS:
    for special in (True, False):
      ids = ours.encode(text, add_special_tokens=special)
      assert ids == ref.encode(text, add_special_tokens=special), (text, special)
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
  chat = [{"role": "user", "content": "What is the capital of France?"}]
  assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
      ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_gguf_tokenizer_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("FINERCUT_CACHE", str(tmp_path / "cache"))
  path = loading.resolve_default_model()
  conversions = []
  convert = loading._convert_gguf_tokenizer
  monkeypatch.setattr(loading, "_convert_gguf_tokenizer",
                      lambda p: conversions.append(p) or convert(p))
  fresh = finercut_jax.load_tokenizer(path)  # converted from the GGUF vocabulary, then cached
  assert conversions == [path]
  cache = loading.tokenizer_cache_dir(path)
  assert cache.startswith(str(tmp_path / "cache" / "tokenizers") + os.sep)
  assert os.path.isfile(os.path.join(cache, "tokenizer.json"))
  assert not [n for n in os.listdir(os.path.dirname(cache)) if n.startswith(".tmp")]
  cached = finercut_jax.load_tokenizer("smollm2-135m")  # same file, by name
  assert conversions == [path]  # not converted again
  text = PASSAGE + "\n\nNaïve café — 1,234.5 «quotes»  double  spaces\tand a tab. <|im_end|>"
  for kwargs in ({}, {"add_special_tokens": False}):
    assert cached(text, **kwargs)["input_ids"] == fresh(text, **kwargs)["input_ids"]
  ids = fresh(text)["input_ids"]
  assert cached.decode(ids) == fresh.decode(ids)
  assert len(cached) == len(fresh)
  assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (
      fresh.bos_token_id, fresh.eos_token_id, fresh.pad_token_id)
  chat = [{"role": "user", "content": "What is the capital of France?"}]
  assert cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
      fresh.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  # The key follows the file: a changed size or mtime, or another path, is a new entry.
  dummy = tmp_path / "x.gguf"
  dummy.write_bytes(b"abc")
  key = loading.tokenizer_cache_dir(str(dummy))
  assert loading.tokenizer_cache_dir(str(dummy)) == key
  os.utime(dummy, ns=(0, 10**9))
  assert loading.tokenizer_cache_dir(str(dummy)) != key
  key = loading.tokenizer_cache_dir(str(dummy))
  dummy.write_bytes(b"abcd")
  os.utime(dummy, ns=(0, 10**9))
  assert loading.tokenizer_cache_dir(str(dummy)) != key
  shutil.copy(dummy, tmp_path / "y.gguf")
  os.utime(tmp_path / "y.gguf", ns=(0, 10**9))
  assert loading.tokenizer_cache_dir(str(tmp_path / "y.gguf")) != loading.tokenizer_cache_dir(
      str(dummy))
