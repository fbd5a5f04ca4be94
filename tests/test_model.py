"""The model against an independent implementation: transformers' PyTorch LlamaForCausalLM.

Tolerance: the tiny models (hf_tiny, initializer_range 0.1) have O(1) logits (max |logit| ~3).
float32 rounding (eps 1.2e-7) through 3 layers with different reduction orders and fused kernels
on the two sides gives differences of ~1e-6..2e-5 (measured); 1e-4 leaves a safe margin, while any
real mismatch (a RoPE frequency, a norm weight not applied, a wrong GQA head mapping, a mask
misread) moves logits by 1e-2 or more.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import finercut_jax
from finercut_jax.model.modules import forward
from finercut_jax.parallel import sharding
from hf_tiny import TINY_CONFIGS, hf_logits, saved_and_loaded

ATOL = 1e-4
BATCH, SEQ = 2, 40  # 40 > original_max_position_embeddings=32 of the llama3 config

# XLA compilation dominates on CPU: every test calls this one jitted forward with the same shapes
# (keep always passed, traced), so each config compiles once.
fwd = jax.jit(forward, static_argnums=1)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
  """(HF torch model, our loaded Llama, tokens) for one tiny config, saved and loaded from disk."""
  name = request.param
  hf, _, model, tokens = saved_and_loaded(name, tmp_path_factory.mktemp(name), BATCH, SEQ)
  return name, hf, model, tokens


def test_config_read_from_checkpoint(tiny):
  name, hf, model, _ = tiny
  cfg, hc = model.config, hf.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (
      hc.num_hidden_layers, hc.hidden_size, hc.intermediate_size, hc.vocab_size)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim)
  assert cfg.tie_embeddings == hc.tie_word_embeddings
  assert ("lm_head" in model.params()) == (not hc.tie_word_embeddings)
  assert (cfg.rope_llama3 is not None) == (name == "llama3_rope_headdim")


def test_logits_match_transformers(tiny):
  _, hf, model, tokens = tiny
  ref = hf_logits(hf, tokens)
  assert np.abs(ref).max() > 1.0, "reference logits too small for the tolerance to mean anything"
  out = np.asarray(model(jnp.asarray(tokens)))  # the NNX module, keep=None
  assert out.dtype == np.float32 and out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


def masks(num_layers: int) -> list[np.ndarray]:
  rng = np.random.RandomState(42)
  out = [rng.rand(num_layers, 2) < 0.5 for _ in range(4)]
  all_attn_removed = np.ones((num_layers, 2), bool)
  all_attn_removed[:, 0] = False
  all_ffn_removed = np.ones((num_layers, 2), bool)
  all_ffn_removed[:, 1] = False
  only_last_ffn = np.zeros((num_layers, 2), bool)
  only_last_ffn[-1, 1] = True
  everything_removed = np.zeros((num_layers, 2), bool)
  return out + [all_attn_removed, all_ffn_removed, only_last_ffn, everything_removed]


def test_keep_mask_matches_zeroed_hf_sublayers(tiny):
  _, hf, model, tokens = tiny
  cfg, params = model.config, model.params()
  full = hf_logits(hf, tokens)
  for keep in masks(cfg.num_layers):
    ref = hf_logits(hf, tokens, keep)
    out = np.asarray(fwd(params, cfg, jnp.asarray(tokens), jnp.asarray(keep)))
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL, err_msg=f"keep={keep.tolist()}")
    # The hooks really removed something (else the comparison above proves nothing).
    assert np.abs(ref - full).max() > 1e-2


def poison(params, keep):
  """params with every weight of the sublayers removed by `keep` set to NaN."""
  out = {**params, "layers": dict(params["layers"])}
  for kind, names in ((0, ("attn_norm", "wq", "wk", "wv", "wo")),
                      (1, ("ffn_norm", "w_gate", "w_up", "w_down"))):
    removed = np.flatnonzero(~keep[:, kind])
    for name in names:
      out["layers"][name] = out["layers"][name].at[removed].set(jnp.nan)
  return out


def test_removed_sublayer_is_not_computed(tiny):
  """A removed sublayer's branch is skipped, not multiplied by zero: NaN weights do not leak."""
  _, hf, model, tokens = tiny
  cfg = model.config
  keep = np.ones((cfg.num_layers, 2), bool)
  keep[1, 0] = keep[0, 1] = False
  out = np.asarray(fwd(poison(model.params(), keep), cfg, jnp.asarray(tokens), jnp.asarray(keep)))
  np.testing.assert_allclose(out, hf_logits(hf, tokens, keep), rtol=0, atol=ATOL)


# The batched path does not depend on the config: one config (one more compile) is enough.
@pytest.mark.parametrize("tiny", ["llama3_rope_headdim"], indirect=True)
def test_batched_keep_masks_match_single_masks(tiny):
  """The scorer vmaps over masks (both branches are then computed and one selected)."""
  _, _, model, tokens = tiny
  cfg, params = model.config, model.params()
  ms = np.stack(masks(cfg.num_layers))
  tokens = jnp.asarray(tokens)
  batched = np.asarray(jax.jit(jax.vmap(lambda k: forward(params, cfg, tokens, k)))(ms))
  for keep, out in zip(ms, batched):
    single = np.asarray(fwd(params, cfg, tokens, jnp.asarray(keep)))
    np.testing.assert_allclose(out, single, rtol=0, atol=1e-5)
  # NaN weights of a removed sublayer do not leak through the select either.
  keep = ms[0]
  assert not keep.all()
  out = jax.jit(jax.vmap(lambda k: forward(poison(params, keep), cfg, tokens, k)))(keep[None])
  np.testing.assert_allclose(np.asarray(out[0]), batched[0], rtol=0, atol=1e-5)


def test_nnx_split_merge_roundtrip(tiny):
  """The NNX module's state is exactly the functional core's params, and merges back."""
  _, _, model, _ = tiny
  graphdef, state = nnx.split(model)
  params = model.params()
  assert sum(x.size for x in jax.tree.leaves(state)) == sum(
      x.size for x in jax.tree.leaves(params))
  merged = nnx.merge(graphdef, state)
  jax.tree.map(np.testing.assert_array_equal, merged.params(), params)


def test_param_shapes_are_checked():
  cfg = finercut_jax.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2,
                                 num_heads=2, num_kv_heads=1, head_dim=4)
  params = jax.tree.map(np.zeros, finercut_jax.model.modules.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  finercut_jax.Llama.from_params(cfg, params)  # the right shapes are accepted
  params["layers"]["wk"] = params["layers"]["wk"][:, :, :2]
  with pytest.raises(ValueError, match=r"k_proj.*shape \(2, 8, 2\).*expected \(2, 8, 4\)"):
    finercut_jax.Llama.from_params(cfg, params)
  del params["final_norm"]
  with pytest.raises(ValueError, match="final_norm.*missing"):
    finercut_jax.Llama.from_params(cfg, params)


def readme_example() -> str:
  """The README's "Use it from your own JAX code" example, as written there."""
  text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  after = text.split("<!-- example: tests/test_model.py runs this block", 1)[1]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs(tmp_path):
  """The example runs as written on the default model (only the output directory moved)."""
  code = readme_example()
  assert code.count("/tmp/pruned_example") == 2
  code = code.replace("/tmp/pruned_example", str(tmp_path / "pruned"))
  scope = {}
  exec(compile(code, "README.md example", "exec"), scope)
  # What it claims holds: the restored checkpoint is the pruned model.
  pruned, restored, tokens = scope["pruned"], scope["restored"], scope["tokens"]
  np.testing.assert_array_equal(restored.present, scope["keep"])
  np.testing.assert_allclose(np.asarray(restored(tokens)), np.asarray(scope["logits"]),
                             rtol=0, atol=1e-5)
  assert scope["keep"].sum() == 2 * pruned.config.num_layers - 2
  assert len(jax.tree.leaves(scope["lora_params"])) == 2


def test_calls_do_not_recompile(tiny):
  """`model(tokens)` compiles once per structure and shape: a second call, and another model of
  the same structure, reuse the program."""
  _, _, model, tokens = tiny
  model(tokens)
  size = finercut_jax.model.modules._forward._cache_size()
  model(tokens)
  finercut_jax.Llama.from_params(model.config, model.params())(tokens)
  assert finercut_jax.model.modules._forward._cache_size() == size


def test_partition_specs_come_from_the_model():
  """Each parameter's logical axes live on the parameter; the mesh rules turn them into specs,
  keeping heads whole where the model axis does not divide them."""
  cfg = finercut_jax.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
                                 num_layers=2, num_heads=4, num_kv_heads=1, head_dim=2)
  model = nnx.eval_shape(lambda: finercut_jax.Llama(cfg))
  attn = model.layers.attn
  assert attn.q_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "q_heads")
  mesh = AbstractMesh((2, 2), ("cand", "model"))
  specs = sharding.state_shardings(nnx.state(model), mesh, cfg)
  layers = specs["layers"]
  assert layers["attn"]["q_proj"]["kernel"].spec == P(None, None, "model")
  assert layers["attn"]["k_proj"]["kernel"].spec == P(None, None, None)  # 1 KV head: whole
  assert layers["mlp"]["down_proj"]["kernel"].spec == P(None, "model", None)
  assert specs["embed"]["embedding"].spec == P("model", None)
  # The loader places checkpoint-layout tensors by the same axes: every name as its variable.
  fn = sharding.param_sharding_fn(mesh, cfg)
  assert fn("wq", (2, 8, 8)).spec == P(None, None, "model")
  shapes = finercut_jax.model.modules.param_shapes(cfg)
  shapes = {**shapes.pop("layers"), **shapes}
  paths = finercut_jax.model.modules.layout_paths(cfg)
  assert set(paths) == set(shapes)
  for name, (_, path) in paths.items():
    want = functools.reduce(lambda node, key: node[key], path, specs)
    assert fn(name, shapes[name]) == want, name


def test_shapes_are_the_modules():
  """`param_shapes` reads the checkpoint layout's shapes off the modules, for every family's
  parts (biases, experts, tied embeddings), and a model round-trips through that layout."""
  for extra in ({}, {"qkv_bias": True, "tie_embeddings": True},
                {"num_experts": 3, "num_experts_per_tok": 2}):
    cfg = finercut_jax.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12,
                                   num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, **extra)
    model = nnx.eval_shape(lambda: finercut_jax.Llama(cfg))
    params = model.params()
    assert jax.tree.map(lambda x: tuple(x.shape), params) == (
        finercut_jax.model.modules.param_shapes(cfg))
    assert set(params["layers"]) == set(sum(finercut_jax.model.modules.sublayer_param_names(cfg),
                                            ()))
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    again = finercut_jax.Llama.from_params(cfg, params)
    assert jax.tree.structure(nnx.state(again)) == jax.tree.structure(nnx.state(model))
