"""Healing: LoRA and partial fine-tuning of pruned models (finercut_jax.healing, .heal).

Gradients are checked against central finite differences of the same loss (float32: a step of
1e-2 along a random unit direction gives a truncation error O(h^2) ~1e-4 relative and a rounding
error ~eps*|loss|/h ~1e-5; 2e-2 relative tolerance separates both from a wrong gradient, which is
off by O(1)).
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import finercut_ref as R
from finercut_jax import healing
from finercut_jax.healing import data as healing_data
from finercut_jax.healing import trainer as healing_trainer
from finercut_jax.model.modules import Llama
from finercut_jax.parallel.sharding import make_mesh
from finercut_jax.rundir import RunDir
from test_main import job_assets, job_config, text_lines  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_pruned():
  cfg, params, _ = R.tiny_model()
  keep = np.ones((cfg.num_layers, 2), bool)
  keep[1, 0] = keep[2, 1] = False
  return Llama.from_params(cfg, params).prune(keep)


def small_heal(**overrides):
  c = healing.default_heal_config()
  c.steps, c.batch_size, c.micro_batch, c.seq_len = 6, 4, 2, 16
  c.warmup_steps, c.checkpoint_every, c.eval_every, c.learning_rate = 1, 2, 3, 1e-2
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def test_lora_starts_at_the_pruned_model_and_merges_exactly():
  model = tiny_pruned()
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12))
  before = np.asarray(model(tokens))
  healing.add_lora(model, rank=4, alpha=8.0, dropout=0.1, targets=list(healing.LORA_TARGETS))
  assert isinstance(model.layers.attn.q_proj, healing.LoRALinear)
  np.testing.assert_array_equal(np.asarray(model(tokens)), before)  # B = 0, dropout off
  # Train-like adapters: random B. The adapter's logits differ, and merging reproduces them.
  for var in jax.tree.leaves(nnx.state(model, nnx.LoRAParam), is_leaf=lambda x: isinstance(
      x, nnx.Variable)):
    var.set_value(0.05 * jax.random.normal(jax.random.key(var.shape[-1]), var.shape))
  adapted = np.asarray(model(tokens))
  assert np.abs(adapted - before).max() > 1e-3
  healing.merge_lora(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  np.testing.assert_allclose(np.asarray(model(tokens)), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "partial"])
def test_gradients_match_finite_differences(method):
  model = tiny_pruned()
  c = small_heal(method=method, **{"lora.dropout": 0.0, "partial.last_blocks": 1})
  if method == "lora":
    healing.add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["q", "v", "down"])
    for var in jax.tree.leaves(nnx.state(model, nnx.LoRAParam),
                               is_leaf=lambda x: isinstance(x, nnx.Variable)):
      var.set_value(0.1 * jax.random.normal(jax.random.key(3), var.shape))
  selected, _ = healing.trainable_parts(model, c)
  graphdef, trainable, rest = nnx.split(model, selected, ...)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (2, 10)))
  mask = jnp.ones((2, 10), bool)

  def loss(t):
    return healing_trainer._sum_loss(nnx.merge(graphdef, t, rest), tokens, mask)

  grads = jax.grad(loss)(trainable)
  leaves, treedef = jax.tree.flatten(trainable)
  direction = [rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  norm = np.sqrt(sum((d ** 2).sum() for d in direction))
  direction = [d / norm for d in direction]
  h = 1e-2
  shifted = lambda sign: jax.tree.unflatten(treedef, [x + sign * h * d for x, d in
                                                      zip(leaves, direction)])
  numeric = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * h)
  analytic = sum(float((np.asarray(g) * d).sum()) for g, d in zip(jax.tree.leaves(grads),
                                                                   direction))
  assert abs(analytic) > 1e-2  # the check has something to compare
  assert analytic == pytest.approx(numeric, rel=2e-2)


def test_partial_trains_only_the_chosen_rows():
  model = tiny_pruned()
  c = small_heal(method="partial", **{"partial.last_blocks": 1, "partial.lm_head": False})
  selected, mask_fn = healing.trainable_parts(model, c)
  trainable = nnx.state(model, selected)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
  assert paths and all("layers" in p for p in paths)
  masks = jax.tree_util.tree_map_with_path(lambda p, x: mask_fn(p, x.shape), trainable)
  present = model.present
  last = np.flatnonzero(present.any(axis=1))[-1]
  for kind, column, name in (("attn", 0, "q_proj"), ("mlp", 1, "down_proj")):
    want = (np.flatnonzero(present[:, column]) == last).astype(np.float32)
    got = np.asarray(masks["layers"][kind][name]["kernel"]).reshape(-1)
    np.testing.assert_array_equal(got, want)
    assert want.sum() <= 1 and len(want) > 1  # some rows frozen, at most the last trained


def test_batches_are_a_function_of_the_step():
  a = [healing.batch_indices(s, 4, 10, seed=0) for s in range(6)]
  b = [healing.batch_indices(s, 4, 10, seed=0) for s in (3, 4, 5)]
  for x, y in zip(a[3:], b):
    np.testing.assert_array_equal(x, y)
  epoch = np.concatenate(a[:2] + [a[2][:2]])  # the first 10 windows: one permutation
  assert sorted(epoch.tolist()) == list(range(10))


def test_overlap_with_protected_text_is_refused():
  calib = np.arange(100, 164)
  train = np.stack([np.arange(0, 40), np.arange(100, 140)])  # the second copies calibration text
  with pytest.raises(ValueError, match="spans of 32 tokens with the calibration set"):
    healing.check_no_overlap(train, np.ones_like(train, bool), {"calibration set": calib})
  healing.check_no_overlap(train[:1], np.ones((1, 40), bool), {"calibration set": calib})


@pytest.fixture(scope="module")
def pruned_run(job_assets, tmp_path_factory):  # noqa: F811
  """A finished tiny search run (pruned checkpoints at 0.25 and 0.5), with enough text."""
  from finercut_jax import jobs
  model_dir, _, _ = job_assets
  root = tmp_path_factory.mktemp("heal")
  text = root / "text.txt"
  text.write_text("\n".join(text_lines(400)) + "\n")
  c = job_config(model_dir, str(text), root / "run")
  c.eval.enabled = False
  jobs.run_pruning(c)
  return str(root / "run")


def copy_run(run_dir, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(run_dir, target)
  return target


def test_resume_after_interruption_gives_identical_weights(pruned_run, tmp_path):
  straight = copy_run(pruned_run, tmp_path / "a")
  out = healing.heal_run(straight, 0.5, small_heal(), progress=False, log=lambda *_: None)
  resumed = copy_run(pruned_run, tmp_path / "b")
  original = healing.Trainer.step
  calls = []

  def stop_after_three(self, *args, **kwargs):
    if len(calls) == 3:
      raise KeyboardInterrupt  # a kill between steps: the checkpoint at step 2 is the last
    calls.append(1)
    return original(self, *args, **kwargs)

  healing.Trainer.step = stop_after_three
  try:
    with pytest.raises(KeyboardInterrupt):
      healing.heal_run(resumed, 0.5, small_heal(), progress=False, log=lambda *_: None)
  finally:
    healing.Trainer.step = original
  logs = []
  out2 = healing.heal_run(resumed, 0.5, small_heal(), progress=False, log=logs.append)
  assert any("resuming at step 2" in line for line in logs)
  a = json.load(open(os.path.join(out, "healing.json")))
  b = json.load(open(os.path.join(out2, "healing.json")))
  assert [s["loss"] for s in a["steps"]] == [s["loss"] for s in b["steps"]]
  assert a["heldout"] == b["heldout"] and a["complete"] and b["complete"]
  from finercut_jax.model import checkpoint
  m1, _ = checkpoint.load_pruned(straight, 0.5, healed=True)
  m2, _ = checkpoint.load_pruned(resumed, 0.5, healed=True)
  jax.tree.map(np.testing.assert_array_equal, m1.params(), m2.params())
  # Healing changed the model, and only through the adapters' merge: the structure is the same.
  pruned, _ = checkpoint.load_pruned(straight, 0.5)
  np.testing.assert_array_equal(m1.present, pruned.present)
  assert np.abs(np.asarray(m1.params()["attn"]["wq"]) -
                np.asarray(pruned.params()["attn"]["wq"])).max() > 0
  # A changed setting does not resume the other run's checkpoints.
  with pytest.raises(ValueError, match="other settings"):
    healing.heal_run(resumed, 0.5, small_heal(learning_rate=5e-3), progress=False,
                     log=lambda *_: None)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(pruned_run, tmp_path):
  run = copy_run(pruned_run, tmp_path)
  original = healing.Trainer.step
  calls = []

  def poisoned(self, opt_state, step, tokens, mask):
    if step == 3:  # weights turn NaN after a checkpointed step 2
      self.trainable = jax.tree.map(lambda x: x * jnp.nan, self.trainable)
    calls.append(step)
    return original(self, opt_state, step, tokens, mask)

  healing.Trainer.step = poisoned
  try:
    with pytest.raises(healing.NonFiniteLoss, match="healing step 3.*NaN.*step 2.* is kept"):
      healing.heal_run(run, 0.5, small_heal(), progress=False, log=lambda *_: None)
  finally:
    healing.Trainer.step = original
  train_dir = RunDir(run).healing_train_dir(0.5)
  assert sorted(int(d) for d in os.listdir(train_dir) if d.isdigit()) == [2]
  assert not os.path.exists(os.path.join(RunDir(run).checkpoint_dir(0.5, healed=True),
                                         "model.json"))


def test_heal_command_and_evaluation_report(pruned_run, tmp_path):
  """The CLI heals a run with overrides on 8 simulated devices (batch over 4, weights over 2); the
  loss curve equals the one-device run's; evaluation reports the healed model."""
  run = copy_run(pruned_run, tmp_path / "cli")
  config_path = os.path.join(run, "config.json")
  config = json.load(open(config_path))
  config["scorer"]["mesh_cand"] = 0  # every device (the search ran on one): a 4 x 2 mesh
  config["scorer"]["mesh_model"] = 2
  json.dump(config, open(config_path, "w"))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
  args = ["--heal.steps=4", "--heal.batch_size=8", "--heal.micro_batch=8", "--heal.seq_len=16",
          "--heal.warmup_steps=1", "--heal.checkpoint_every=2", "--heal.eval_every=2",
          "--heal.learning_rate=1e-2", "--heal.method=partial"]
  proc = subprocess.run([sys.executable, "-m", "finercut_jax.heal", f"--run_dir={run}",
                         "--ratio=0.5", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.load(open(RunDir(run).healing_record_file(0.5)))
  one_run = copy_run(pruned_run, tmp_path / "one")
  c = small_heal(steps=4, batch_size=8, micro_batch=8, eval_every=2, method="partial")
  healing.heal_run(one_run, 0.5, c, mesh=make_mesh(1, 1), progress=False, log=lambda *_: None)
  one = json.load(open(RunDir(one_run).healing_record_file(0.5)))
  np.testing.assert_allclose([s["loss"] for s in eight["steps"]],
                             [s["loss"] for s in one["steps"]], rtol=1e-4)
  # Bad input: one line, exit code 2.
  bad = subprocess.run([sys.executable, "-m", "finercut_jax.heal", f"--run_dir={run}",
                        "--ratio=0.3"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "no pruned checkpoint for ratio 0.3" in bad.stderr
  from finercut_jax.evaluation.run import evaluate_run, resolve_eval_config
  ec = resolve_eval_config({"tasks": "piqa", "limit": 2, "throughput": {"enabled": False},
                            "perplexity": {"num_tokens": 64}, "plots": False})
  results = evaluate_run(run, ec, log=lambda *_: None)
  assert results["healed"]["0.5"]["name"] == "ratio 0.5 healed"
  assert "perplexity" in results["healed"]["0.5"]
  report = open(os.path.join(run, "report.md")).read()
  assert "## Healing" in report and "| 0.5 | partial | 4 |" in report


def test_alpaca_records_train_on_the_response_only(job_assets, tmp_path):  # noqa: F811
  _, tokenizer, _ = job_assets
  from finercut_jax.evaluation.lm import encode
  records = [{"instruction": "the cat", "input": "", "output": "a dog ran"},
             {"instruction": "the cat", "input": "sat on", "output": "the mat"}]
  path = tmp_path / "alpaca.json"
  path.write_text(json.dumps(records))
  tokens, mask = healing_data._alpaca_windows(tokenizer, str(path), 64)
  assert tokens.shape == (2, 64)
  for row, m, r in zip(tokens, mask, records):
    response = encode(tokenizer, r["output"], add_special_tokens=False)
    targets = row[1:][m[:-1]]  # the tokens the masked positions predict
    assert targets[:len(response)].tolist() == response
  (tmp_path / "bad.json").write_text('{"not": "a list"}')
  with pytest.raises(ValueError, match="JSON list of"):
    healing_data._alpaca_windows(tokenizer, str(tmp_path / "bad.json"), 64)
