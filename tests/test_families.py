"""Mistral, Qwen2 and Mixtral against transformers' PyTorch models, loaded from disk.

The same tolerance as the Llama tests (test_model.py, 1e-4 on O(1) logits; measured differences
are ~3e-6). Each family's distinguishing part is made to matter: Mistral's window (6 positions) is
far shorter than the 40-token sequences, Qwen2's biases are random (transformers initialises them
to zero), Mixtral routes each token to 2 of 4 experts by a random router.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig

import finercut_jax
from finercut_jax import UnsupportedConfigError, load_params
from finercut_jax.model import checkpoint
from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.loading import CheckpointError, load_config
from finercut_jax.model.modules import forward, sublayer_param_names
from hf_tiny import (FAMILY_CONFIGS, edit_config, hf_logits, make_hf_model, save_hf_model,
                     saved_and_loaded, write_gguf)

ATOL = 1e-4
BATCH, SEQ = 2, 40
fwd = jax.jit(forward, static_argnums=1)


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family(request, tmp_path_factory):
  """(name, HF torch model, its directory, our loaded Llama, tokens) for one family."""
  name = request.param
  return (name, *saved_and_loaded(name, tmp_path_factory.mktemp(name), BATCH, SEQ))


def masks(num_layers):
  rng = np.random.RandomState(7)
  out = [rng.rand(num_layers, 2) < 0.5 for _ in range(3)]
  no_attn = np.ones((num_layers, 2), bool)
  no_attn[:, 0] = False
  no_ffn = np.ones((num_layers, 2), bool)
  no_ffn[:, 1] = False
  return out + [no_attn, no_ffn]


def test_config_read_from_checkpoint(family):
  name, hf, _, model, _ = family
  cfg, hc = model.config, hf.config
  assert cfg.model_type == hc.model_type
  assert cfg.qkv_bias == (hc.model_type == "qwen2")
  assert cfg.sliding_window == getattr(hc, "sliding_window", None)
  assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
  assert cfg.tie_embeddings == hc.tie_word_embeddings
  if hc.model_type == "mixtral":
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (hc.num_local_experts,
                                                          hc.num_experts_per_tok)
  else:
    assert not cfg.is_moe


def test_logits_match_transformers_with_keep_masks(family):
  _, hf, _, model, tokens = family
  ref = hf_logits(hf, tokens)
  assert np.abs(ref).max() > 1.0, "reference logits too small for the tolerance to mean anything"
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), ref, rtol=0, atol=ATOL)
  cfg, params = model.config, model.params()
  for keep in masks(cfg.num_layers):
    want = hf_logits(hf, tokens, keep)
    got = np.asarray(fwd(params, cfg, jnp.asarray(tokens), jnp.asarray(keep)))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"keep={keep.tolist()}")
    assert np.abs(want - ref).max() > 1e-2  # the hooks removed something


def test_hidden_states_match_transformers(family):
  """The residual stream entering every block (our model with the blocks from there on removed)
  equals transformers' hidden_states, and the final normed stream its last one."""
  _, hf, _, model, tokens = family
  with torch.no_grad():
    states = hf(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
  L = model.config.num_layers
  for l in range(L):
    keep = np.ones((L, 2), bool)
    keep[l:] = False
    got = np.asarray(model.hidden(jnp.asarray(tokens), jnp.asarray(keep)))
    np.testing.assert_allclose(got, states[l].numpy(), rtol=0, atol=ATOL, err_msg=f"block {l}")
  normed = model.final_norm(model.hidden(jnp.asarray(tokens)))
  np.testing.assert_allclose(np.asarray(normed), states[L].numpy(), rtol=0, atol=ATOL)


def test_removed_sublayer_is_not_computed(family):
  """NaN in every weight of the removed sublayers (biases, router and experts included) does not
  reach the output."""
  _, hf, _, model, tokens = family
  cfg = model.config
  keep = np.ones((cfg.num_layers, 2), bool)
  keep[1, 0] = keep[0, 1] = False
  params = model.params()
  layers = dict(params["layers"])
  for kind, names in enumerate(sublayer_param_names(cfg)):
    for name in names:
      layers[name] = layers[name].at[np.flatnonzero(~keep[:, kind])].set(jnp.nan)
  out = fwd({**params, "layers": layers}, cfg, jnp.asarray(tokens), jnp.asarray(keep))
  np.testing.assert_allclose(np.asarray(out), hf_logits(hf, tokens, keep), rtol=0, atol=ATOL)


def test_restored_pruned_checkpoint_matches_transformers(family, tmp_path):
  _, hf, directory, model, tokens = family
  keep = np.array([[0, 1], [1, 0], [1, 1]], bool)
  out = checkpoint.save_model(str(tmp_path / "pruned"), model.prune(keep), source=directory)
  restored, _ = checkpoint.restore_pruned(out)
  assert restored.config == model.config
  np.testing.assert_array_equal(restored.present, keep)
  np.testing.assert_allclose(np.asarray(restored(jnp.asarray(tokens))),
                             hf_logits(hf, tokens, keep), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- Mixtral routing


@pytest.mark.parametrize("top_k", [1, 2])
def test_mixtral_every_token_routed_to_one_expert(tmp_path, top_k):
  """A router that sends every token of every layer to expert 2 (with top-1: only there; with
  top-2: there and to a second expert that varies), the other experts getting no token or few:
  the dispatch's edge cases, against transformers."""
  hf = make_hf_model("mixtral_top2", seed=4, num_experts_per_tok=top_k)
  with torch.no_grad():
    # A large constant first embedding column dominates every normed stream's first component,
    # and expert 2's router row reads it with the largest weight; the others read it equally, so
    # the rest of the stream picks a top-2 token's second expert.
    hf.model.embed_tokens.weight[:, 0] = 20.0
    for block in hf.model.layers:
      block.mlp.gate.weight[:, 0] = torch.tensor([-4.0, -4.0, 6.0, -4.0])
  chosen = []
  hooks = [block.mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
           for block in hf.model.layers]
  tokens = np.random.RandomState(1).randint(0, hf.config.vocab_size, (BATCH, SEQ))
  ref = hf_logits(hf, tokens)
  for h in hooks:
    h.remove()
  assert all(bool((c == 2).any(dim=-1).all()) for c in chosen), "not every token went to expert 2"
  if top_k == 2:
    assert len(set(torch.cat(chosen).flatten().tolist())) > 2  # the second choice varies
  model, _ = finercut_jax.load_model(save_hf_model(hf, tmp_path / "m"), tokenizer=False)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), ref, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- Mistral's window


@pytest.mark.parametrize("family", ["mistral_window"], indirect=True)
def test_mistral_window_default_and_effect(family, tmp_path):
  _, hf, directory, model, tokens = family
  # The window changes the output here (else the parity test would not test it).
  wide = LlamaConfig(**{**model.config.to_dict(), "sliding_window": None})
  no_window = np.asarray(fwd(model.params(), wide, jnp.asarray(tokens)))
  assert np.abs(no_window - hf_logits(hf, tokens)).max() > 1e-2
  # A config.json without the key means transformers' default window, as transformers reads it.
  for value, want in (("absent", 4096), (None, None), (32, 32)):
    d = tmp_path / str(value)
    shutil.copytree(directory, d)
    edit_config(d, lambda c: c.pop("sliding_window") if value == "absent" else c.update(
        sliding_window=value))
    assert AutoConfig.from_pretrained(d).sliding_window == want
    assert load_config(str(d)).sliding_window == want


# ----------------------------------------------------------------------------- Qwen2 GGUF


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_gguf_matches_transformers(tmp_path, tied):
  """llama.cpp's `qwen2` layout: q/k rows not permuted (NEOX RoPE), q/k/v biases as tensors."""
  hf = make_hf_model("qwen2_tied", seed=5, tie_word_embeddings=tied)
  path = write_gguf(hf, tmp_path / "qwen2.gguf")
  cfg, params = load_params(path)
  assert (cfg.model_type, cfg.qkv_bias, cfg.tie_embeddings) == ("qwen2", True, tied)
  assert cfg.rope_theta == 1e6
  tokens = np.random.RandomState(2).randint(0, hf.config.vocab_size, (BATCH, SEQ))
  out = np.asarray(fwd(params, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(out, hf_logits(hf, tokens), rtol=0, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(params["layers"]["bk"][1]),
                                hf.model.layers[1].self_attn.k_proj.bias.detach().numpy())


# ----------------------------------------------------------------------------- refusals


def _config(**changes):
  base = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
          "num_hidden_layers": 2, "num_attention_heads": 2}
  return {**base, **changes}


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
     r"use_sliding_window=True: sliding windows on some layers only"),
    (dict(sliding_window=8), r"sliding_window=8: a Llama config has no sliding window"),
    (dict(model_type="mixtral", num_local_experts=2, num_experts_per_tok=3),
     r"num_experts_per_tok=3 must be between 1 and num_experts=2"),
    (dict(model_type="qwen2_moe"), r"model_type='qwen2_moe'"),
    (dict(attention_bias=True), r"attention_bias=True: biases in attention/MLP projections"),
])
def test_unsupported_configs_are_refused(changes, message):
  with pytest.raises(UnsupportedConfigError, match=message):
    LlamaConfig.from_hf(_config(**changes))


@pytest.mark.parametrize("changes", [
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    dict(use_sliding_window=True, max_window_layers=0),  # transformers' default window
    dict(sliding_window=8, max_window_layers=0),  # use_sliding_window is false by default
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),  # no layer windowed
    dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"] * 2),
])
def test_qwen2_window_read_as_transformers_reads_it(changes):
  """Each case's window as transformers applies it (its per-layer `layer_types`), and back."""
  from transformers import Qwen2Config
  hf = _config(model_type="qwen2", **changes)
  ref = Qwen2Config(**{k: v for k, v in hf.items() if k != "model_type"})
  windowed = {t for t in ref.layer_types} == {"sliding_attention"}
  cfg = LlamaConfig.from_hf(hf)
  assert cfg.sliding_window == (ref.sliding_window if windowed else None)
  back = LlamaConfig.from_hf(dict(cfg.to_hf(), intermediate_size=12))
  assert back.sliding_window == cfg.sliding_window


def test_mixtral_defaults_for_omitted_fields():
  from transformers import MixtralConfig
  cfg = LlamaConfig.from_hf(_config(model_type="mixtral"))
  ref = MixtralConfig()
  assert (cfg.rms_norm_eps, cfg.rope_theta) == (ref.rms_norm_eps,
                                                ref.rope_parameters["rope_theta"])
  assert (cfg.num_experts, cfg.num_experts_per_tok) == (ref.num_local_experts,
                                                        ref.num_experts_per_tok)


def test_gguf_mixture_of_experts_is_refused(tmp_path):
  hf = make_hf_model("gqa_tied", seed=5)
  path = write_gguf(hf, tmp_path / "moe.gguf", extra_keys={"llama.expert_count": ("uint32", 8)})
  with pytest.raises(CheckpointError, match=r"llama\.expert_count=8 \(a mixture of experts"):
    load_params(path)


@pytest.mark.parametrize("family", ["mixtral_top2"], indirect=True)
def test_mixtral_fused_expert_layout_is_refused(family, tmp_path):
  """A Mixtral checkpoint in transformers' in-memory layout (experts fused into one tensor) is not
  the released layout: refused with the tensors named, not misread."""
  _, hf, directory, _, _ = family
  import safetensors.numpy
  d = tmp_path / "fused"
  d.mkdir()
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  assert any("experts.gate_up_proj" in k for k in tensors)
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  with open(os.path.join(directory, "config.json")) as f:
    (d / "config.json").write_text(json.dumps(json.load(f)))
  with pytest.raises(CheckpointError, match=r"block_sparse_moe\.gate\.weight is missing"):
    load_params(str(d))


# ----------------------------------------------------------------------------- export


def test_export_loads_in_transformers(family, tmp_path):
  """Exported in the family's own architecture: whole blocks dropped (`llama`), and single
  sublayers as zero weights (what `auto` picks for these families: DeciLM cannot hold biases,
  experts or a window, and refuses)."""
  from transformers import AutoModelForCausalLM
  _, hf, directory, model, tokens = family
  blocks = np.array([[1, 1], [0, 0], [1, 1]], bool)
  single = np.array([[1, 0], [0, 0], [1, 1]], bool)
  for keep, fmt, want_fmt in ((blocks, "auto", "llama"), (single, "auto", "llama_zeroed")):
    out = str(tmp_path / want_fmt)
    assert finercut_jax.export_model(model.prune(keep), out, fmt=fmt, source=directory) == want_fmt
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is type(hf) and exported.config.num_hidden_layers == 2
    np.testing.assert_allclose(hf_logits(exported, tokens), hf_logits(hf, tokens, keep),
                               rtol=0, atol=ATOL, err_msg=want_fmt)
  with pytest.raises(finercut_jax.ExportError, match=r"--format=decilm: a \w+ model has .*"
                                                     r"use --format=llama_zeroed"):
    finercut_jax.export_model(model.prune(single), str(tmp_path / "decilm"), fmt="decilm",
                              source=directory)
  assert not os.path.exists(tmp_path / "decilm")


@pytest.mark.parametrize("family", ["mixtral_top2"], indirect=True)
def test_lora_on_experts_is_refused_attention_lora_works(family):
  from finercut_jax.healing.lora import add_lora, merge_lora
  _, _, _, model, tokens = family
  pruned = model.prune(np.array([[1, 1], [0, 1], [1, 1]], bool))
  with pytest.raises(ValueError, match=r"gate,up,down: LoRA on a mixture's experts is not "
                                       r"implemented; set --config.heal.lora.targets=q,k,v,o"):
    add_lora(pruned, rank=2, alpha=4.0, dropout=0.0)
  before = np.asarray(pruned(jnp.asarray(tokens)))
  add_lora(pruned, rank=2, alpha=4.0, dropout=0.0, targets=("q", "k", "v", "o"))
  merge_lora(pruned)  # lora_b starts at zero: the merged model is the same model
  np.testing.assert_allclose(np.asarray(pruned(jnp.asarray(tokens))), before, rtol=0, atol=1e-6)
