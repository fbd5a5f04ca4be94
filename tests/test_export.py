"""Exported Hugging Face checkpoints (finercut_jax.model.export_formats) against independent
readers.

- Plain Llama exports are loaded by transformers' own `AutoModelForCausalLM` and compared with the
  pruned model here (tolerance 1e-4: the parity tests' float32 tolerance, see test_model.py).
- DeciLM exports: transformers cannot run them (vLLM's model code does), so the test reads their
  config the way vLLM's `DeciLMDecoderLayer` does (the schema below), checks that the safetensors
  hold exactly the tensors vLLM would create, and runs the weights in transformers' torch
  `LlamaForCausalLM` with the no-op sublayers' outputs zeroed: the no-op semantics, computed
  independently.
- Reading an export back with this project's loader runs the same float32 weights through the
  same code: logits agree to 1e-6.
"""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import finercut_jax
from benchmarks.processes import free_port, wait_all
from finercut_jax.evaluation.perplexity import perplexity
from finercut_jax.model import checkpoint, export_formats
from finercut_jax.model.export_formats import ExportError
from finercut_jax.rundir import RunDir
from finercut_jax.scoring.scorer import Candidate, Scorer
from hf_tiny import edit_config, hf_logits, make_hf_model, make_tokenizer, save_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 5
TOKENS = np.random.RandomState(0).randint(0, 61, (2, 24))  # within the tokenizer's 61 ids
BLOCKS = np.array([[1, 1], [0, 0], [1, 1], [1, 1], [0, 0]], bool)
SUBLAYERS = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1]], bool)


@pytest.fixture(scope="module", params=["llama3_rope_headdim", "gqa_tied"])
def source(request, tmp_path_factory):
  """(source checkpoint dir, its dense Llama, its tokenizer): a tiny transformers model whose
  config.json also lists `layer_types` (per layer, checked by transformers against the count)."""
  root = tmp_path_factory.mktemp(request.param)
  directory = save_hf_model(make_hf_model(request.param, seed=2, num_layers=L), root / "model")
  tokenizer = make_tokenizer(directory)
  edit_config(directory, lambda config: config.update(layer_types=["full_attention"] * L))
  model, _ = finercut_jax.load_model(directory)
  return directory, model, tokenizer


def make_run(source, keep, run_dir, ratio=0.25):
  directory, model, tokenizer = source
  checkpoint.save_pruned(RunDir(str(run_dir)).checkpoint_dir(ratio), model.config,
                         model.params(), np.asarray(keep, bool), tokenizer=tokenizer,
                         source=directory)
  return checkpoint.load_pruned(str(run_dir), ratio)[0]


def logits(model):
  out = np.asarray(model(jnp.asarray(TOKENS)))
  assert np.abs(out).max() > 1.0, "logits too small for the tolerance to mean anything"
  return out


def read_tensors(directory):
  """{name: shape} of every tensor in an export, through its index when sharded."""
  index = os.path.join(directory, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  shapes = {}
  for fname in files:
    with safetensors.safe_open(os.path.join(directory, fname), framework="np") as f:
      shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
  return shapes


# ----------------------------------------------------------------------------- whole blocks


def test_block_export_loads_in_transformers(source, tmp_path):
  pruned = make_run(source, BLOCKS, tmp_path / "run")
  out = str(tmp_path / "export")
  # A small shard limit: several files and an index, as a large model gets.
  fmt = export_formats.export_pruned(str(tmp_path / "run"), 0.25, out, max_shard_bytes=40_000)
  assert fmt == "llama"
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["num_hidden_layers"] == 3 and config["layer_types"] == ["full_attention"] * 3
  assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1

  want = logits(pruned)
  hf = AutoModelForCausalLM.from_pretrained(out).eval()
  assert hf.config.num_hidden_layers == 3
  np.testing.assert_allclose(hf_logits(hf, TOKENS), want, rtol=0, atol=1e-4)
  tok = AutoTokenizer.from_pretrained(out)
  assert tok.get_vocab() == source[2].get_vocab()
  assert os.path.exists(os.path.join(out, "generation_config.json"))
  meta = json.load(open(os.path.join(out, "finercut_export.json")))
  assert meta["blocks"] == [0, 2, 3] and meta["keep"] == BLOCKS.tolist()

  back, back_tok = finercut_jax.load_model(out)
  assert back.present.shape == (3, 2) and back.present.all()
  np.testing.assert_allclose(logits(back), want, rtol=0, atol=1e-6)


def test_round_trip_scores_and_evaluates_identically(source, tmp_path):
  """A block export read back by load_model: the same FinerCut scores (of the sublayers the
  two models share) and the same perplexity as the pruned model it came from."""
  pruned = make_run(source, BLOCKS, tmp_path / "run")
  out = str(tmp_path / "export")
  export_formats.export_pruned(str(tmp_path / "run"), 0.25, out)
  back, _ = finercut_jax.load_model(out)
  blocks = [0, 2, 3]  # exported layer i is source block blocks[i]
  ours = Scorer(back, TOKENS).score(np.ones((3, 2), bool), [Candidate(s, s + 1) for s in
                                                             range(6)])[0]
  theirs = Scorer(pruned, TOKENS).score(BLOCKS, [Candidate(2 * blocks[s // 2] + s % 2,
                                                           2 * blocks[s // 2] + s % 2 + 1)
                                                 for s in range(6)])[0]
  assert np.all(ours > 0)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
  a = perplexity(back, TOKENS.reshape(-1), seq_len=12)
  b = perplexity(pruned, TOKENS.reshape(-1), seq_len=12)
  assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_bfloat16_export(source, tmp_path):
  make_run(source, BLOCKS, tmp_path / "run")
  out = str(tmp_path / "export")
  export_formats.export_pruned(str(tmp_path / "run"), 0.25, out, dtype="bfloat16")
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="flax") as f:
    embed = np.asarray(f.get_tensor("model.embed_tokens.weight"))
  assert embed.dtype.name == "bfloat16"
  want = np.asarray(source[1].params()["embed"]).astype(embed.dtype)
  np.testing.assert_array_equal(embed, want)


# ----------------------------------------------------------------------------- single sublayers


def _ffn_mult_to_intermediate_size(ffn_mult, n_embd):
  """vLLM's rule (nemotron_nas.py), restated."""
  size = int(2 * ffn_mult * n_embd / 3)
  return size if size % 256 == 0 else size + 256 - size % 256


def vllm_expected_tensors(directory):
  """The tensors vLLM's DeciLMForCausalLM creates for an export, read as vLLM reads its config.

  Schema, from vllm-project/vllm vllm/model_executor/models/nemotron_nas.py (DeciLMDecoderLayer.
  __init__, DeciModel.__init__, DeciLMForCausalLM.__init__): the config is `AutoConfig` with
  trust_remote_code; `config.block_configs[i]` has `.attention.no_op`,
  `.attention.n_heads_in_group` (num_kv_heads = num_attention_heads // it), `.ffn.no_op`, and
  `.ffn.ffn_mult` (width by `_ffn_mult_to_intermediate_size`) if present, else
  `.ffn.intermediate_size`; `.ffn.hidden_act` if present, else `config.hidden_act`. A present
  attention brings `input_layernorm`, a present FFN `post_attention_layernorm`. Top level:
  `hidden_size`, `num_attention_heads`, `head_dim`, `rms_norm_eps`, `vocab_size`,
  `num_hidden_layers`, `tie_word_embeddings`, `rope_parameters`, `max_position_embeddings`.
  """
  config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
  assert config.architectures == ["DeciLMForCausalLM"] and config.model_type == "nemotron-nas"
  D, H, hd = config.hidden_size, config.num_attention_heads, config.head_dim
  assert len(config.block_configs) == config.num_hidden_layers
  assert config.rope_parameters["rope_type"] in ("default", "llama3")
  assert isinstance(config.rms_norm_eps, float) and config.max_position_embeddings > 0
  shapes = {"model.embed_tokens.weight": (config.vocab_size, D), "model.norm.weight": (D,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, D)
  for i, block in enumerate(config.block_configs):
    p = f"model.layers.{i}."
    if not block.attention.no_op:
      kv = H // block.attention.n_heads_in_group
      shapes.update({p + "input_layernorm.weight": (D,),
                     p + "self_attn.q_proj.weight": (H * hd, D),
                     p + "self_attn.k_proj.weight": (kv * hd, D),
                     p + "self_attn.v_proj.weight": (kv * hd, D),
                     p + "self_attn.o_proj.weight": (D, H * hd)})
    if not block.ffn.no_op:
      width = (_ffn_mult_to_intermediate_size(block.ffn.ffn_mult, D)
               if hasattr(block.ffn, "ffn_mult") else block.ffn.intermediate_size)
      assert getattr(block.ffn, "hidden_act", config.hidden_act) == "silu"
      shapes.update({p + "post_attention_layernorm.weight": (D,),
                     p + "mlp.gate_proj.weight": (width, D), p + "mlp.up_proj.weight": (width, D),
                     p + "mlp.down_proj.weight": (D, width)})
  present = [[not b.attention.no_op, not b.ffn.no_op] for b in config.block_configs]
  return shapes, present


def dense_torch_model(directory, num_layers):
  """transformers' LlamaForCausalLM of the exported architecture, holding the exported weights
  (the no-op sublayers' weights stay at their random init: their outputs are zeroed)."""
  config = json.load(open(os.path.join(directory, "config.json")))
  fields = {k: config[k] for k in (
      "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
      "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
      "max_position_embeddings", "tie_word_embeddings")}
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=num_layers,
                                                                 **fields)).eval()
  missing, unexpected = model.load_state_dict(
      load_file(os.path.join(directory, "model.safetensors")), strict=False)
  assert not unexpected
  return model


def test_decilm_export(source, tmp_path):
  pruned = make_run(source, SUBLAYERS, tmp_path / "run")
  out = str(tmp_path / "export")
  assert export_formats.export_pruned(str(tmp_path / "run"), 0.25, out) == "decilm"
  want_shapes, present = vllm_expected_tensors(out)
  assert read_tensors(out) == want_shapes  # exactly what vLLM builds: nothing missing or extra
  kept_blocks = [0, 1, 3, 4]  # block 2 (both sublayers removed) is dropped
  assert present == SUBLAYERS[kept_blocks].tolist()

  want = logits(pruned)
  reference = dense_torch_model(out, len(kept_blocks))
  np.testing.assert_allclose(hf_logits(reference, TOKENS, present), want, rtol=0, atol=1e-4)
  back, tokenizer = finercut_jax.load_model(out)  # no remote code runs for the tokenizer
  assert tokenizer.get_vocab() == source[2].get_vocab()
  np.testing.assert_array_equal(back.present, np.asarray(present))
  np.testing.assert_allclose(logits(back), want, rtol=0, atol=1e-6)


def test_decilm_first_block_without_attention(source, tmp_path):
  """vLLM's layer needs the first block's attention: it is written as zero weights (exact)."""
  keep = np.array([[0, 0], [0, 1], [1, 1], [1, 0], [1, 1]], bool)
  pruned = make_run(source, keep, tmp_path / "run")
  out = str(tmp_path / "export")
  export_formats.export_pruned(str(tmp_path / "run"), 0.25, out, fmt="decilm")
  _, present = vllm_expected_tensors(out)
  assert present[0] == [True, True] and present[1:] == keep[2:].tolist()
  meta = json.load(open(os.path.join(out, "finercut_export.json")))
  assert meta["zeroed"] == ["attention of block 1"]
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    assert not f.get_tensor("model.layers.0.self_attn.o_proj.weight").any()
  back, _ = finercut_jax.load_model(out)
  np.testing.assert_allclose(logits(back), logits(pruned), rtol=0, atol=1e-6)


def test_zeroed_llama_export_loads_in_transformers(source, tmp_path):
  pruned = make_run(source, SUBLAYERS, tmp_path / "run")
  out = str(tmp_path / "export")
  export_formats.export_pruned(str(tmp_path / "run"), 0.25, out, fmt="llama_zeroed")
  hf = AutoModelForCausalLM.from_pretrained(out).eval()
  assert hf.config.num_hidden_layers == 4
  np.testing.assert_allclose(hf_logits(hf, TOKENS), logits(pruned), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def leftovers(directory):
  return [f for f in os.listdir(directory) if f.startswith(".tmp-")]


def test_bad_input_is_refused_and_nothing_is_half_written(source, tmp_path, monkeypatch):
  run_dir = str(tmp_path / "run")
  make_run(source, SUBLAYERS, run_dir)
  with pytest.raises(FileNotFoundError, match=r"ratio 0.5 .*ratio_0.25"):
    export_formats.export_pruned(run_dir, 0.5, str(tmp_path / "a"))
  with pytest.raises(ExportError, match="--format=decilm .* --format=llama_zeroed"):
    export_formats.export_pruned(run_dir, 0.25, str(tmp_path / "a"), fmt="llama")
  with pytest.raises(ExportError, match="unknown format 'gguf'"):
    export_formats.export_pruned(run_dir, 0.25, str(tmp_path / "a"), fmt="gguf")
  with pytest.raises(ExportError, match="dtype 'int8'"):
    export_formats.export_pruned(run_dir, 0.25, str(tmp_path / "a"), dtype="int8")
  assert not os.path.exists(tmp_path / "a")

  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  with pytest.raises(ExportError, match="exists and is not empty"):
    export_formats.export_pruned(run_dir, 0.25, str(full))
  assert os.listdir(full) == ["keep.txt"]

  real, calls = safetensors.numpy.save_file, []

  def fail_second(*args, **kwargs):  # a disk that fills up after the first file
    calls.append(1)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    return real(*args, **kwargs)
  monkeypatch.setattr(safetensors.numpy, "save_file", fail_second)
  with pytest.raises(OSError, match="No space"):
    export_formats.export_pruned(run_dir, 0.25, str(tmp_path / "b"), max_shard_bytes=40_000)
  assert len(calls) == 2 and not os.path.exists(tmp_path / "b") and not leftovers(tmp_path)


def test_load_params_refuses_a_decilm_export(source, tmp_path):
  make_run(source, SUBLAYERS, tmp_path / "run")
  out = str(tmp_path / "export")
  export_formats.export_pruned(str(tmp_path / "run"), 0.25, out)
  with pytest.raises(finercut_jax.CheckpointError, match="search its source model"):
    finercut_jax.load_params(out)


def test_cli(source, tmp_path):
  if source[1].config.tie_embeddings:
    pytest.skip("the command line is the same for both sources")
  run_dir = tmp_path / "run"
  make_run(source, BLOCKS, run_dir)
  (run_dir / "config.json").write_text(json.dumps({"search": {"ratio": 0.25}}))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  cmd = [sys.executable, "-m", "finercut_jax.export", f"--run_dir={run_dir}"]
  ok = subprocess.run(cmd + [f"--out={tmp_path / 'x'}"], capture_output=True, text=True,
                      cwd=REPO, env=env, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "(llama)" in ok.stdout and os.path.exists(tmp_path / "x" / "model.safetensors")
  bad = subprocess.run(cmd + [f"--out={tmp_path / 'x'}", "--format=decilm"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'x'} exists and is not empty: choose a new output directory "
      f"(nothing is overwritten)"]


# ----------------------------------------------------------------------------- default model


def test_default_model_block_export_matches_transformers(smollm2, tmp_path):
  """SmolLM2-135M (GGUF source: the config is built from the model) without two blocks."""
  model, tokenizer = smollm2
  keep = np.ones((30, 2), bool)
  keep[[20, 25]] = False
  run_dir = str(tmp_path / "run")
  checkpoint.save_pruned(RunDir(run_dir).checkpoint_dir(0.1), model.config, model.params(), keep,
                         tokenizer=tokenizer, source="smollm2-135m")
  pruned = checkpoint.load_pruned(run_dir, 0.1)[0]
  out = str(tmp_path / "export")
  export_formats.export_pruned(run_dir, 0.1, out)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["num_hidden_layers"] == 28 and config["tie_word_embeddings"]
  assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id,
                                                              tokenizer.eos_token_id)
  tokens = np.asarray([tokenizer.encode("The capital of France is Paris, and the capital of")])
  want = np.asarray(pruned(jnp.asarray(tokens)))
  hf = AutoModelForCausalLM.from_pretrained(out).eval()
  got = hf_logits(hf, tokens)
  # The default model's parity tolerance (test_loading.py: float32 through ~30 blocks).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
  assert got[0, -1].argmax() == want[0, -1].argmax()


# ----------------------------------------------------------------------------- several processes


def test_multi_process_export_matches_one_process(source, tmp_path):
  """Two processes with the model axis across both (each holds half of every projection): the
  files process 0 writes are byte for byte those of a one-process export."""
  if source[1].config.tie_embeddings:
    pytest.skip("one source is enough")
  run_dir = tmp_path / "run"
  make_run(source, SUBLAYERS, run_dir)
  (run_dir / "config.json").write_text(json.dumps({"search": {"ratio": 0.25},
                                                   "scorer": {"mesh_model": 4}}))
  one = str(tmp_path / "one")
  export_formats.export_pruned(str(run_dir), 0.25, one)
  port, procs = free_port(), []
  for i in range(2):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "finercut_jax.export", f"--run_dir={run_dir}",
         f"--out={tmp_path / 'two'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  outputs, _ = wait_all(procs, 300)
  assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
  assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(one))
  for name in ("model.safetensors", "config.json"):
    assert (tmp_path / "two" / name).read_bytes() == open(os.path.join(one, name), "rb").read()
