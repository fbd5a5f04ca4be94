"""The comparison's methods against plain references, and the comparison command.

Similarity statistics: the residual stream at sublayer boundary s is recomputed as the final
stream of the model with every sublayer from s on removed (`Llama.hidden` with a keep mask: the
model's ordinary forward, not the one-pass `residual_streams` the methods use), and the cosines
and angular distances are taken in float64 with numpy. Tolerances: cosines 1e-5 absolute (float32
streams of norm O(1)-O(10), cosines far from +-1 with the tiny model's std-0.3 weights, so
rounding moves them by ~1e-7); angular distances 1e-4 (arccos amplifies a cosine's error by
1/sqrt(1 - c^2), at most ~20 here).

SLEB and BlockPruner: their orderings against the brute-force greedy loop of `finercut_ref`
(a full forward per candidate, float64 perplexity), on the checkpoint the comparison ran on.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import finercut_ref as R
from finercut_jax import jobs
from finercut_jax.model import checkpoint, loading
from finercut_jax.model.modules import Llama
from finercut_jax.search import baselines
from hf_tiny import make_hf_model, make_tokenizer, save_hf_model


def plain_streams(model, tokens) -> np.ndarray:
  """`[2L+1, N, T, D]` float64: the stream entering each sublayer, and the final one."""
  L = model.config.num_layers
  out = []
  for s in range(2 * L + 1):
    keep = np.arange(2 * L).reshape(L, 2) < s
    out.append(np.asarray(model.hidden(jnp.asarray(tokens), keep), np.float64))
  return np.stack(out)


def cos64(a, b):
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def reference_similarities(model, tokens):
  x = plain_streams(model, tokens)
  L = model.config.num_layers
  sub = cos64(x[:-1], x[1:]).mean(axis=(1, 2)).reshape(L, 2)
  block = cos64(x[:-1:2], x[2::2]).mean(axis=(1, 2))
  last = x[::2, :, -1]
  angular = np.zeros((L + 1, L + 1))
  for i in range(L + 1):
    for j in range(L + 1):
      angular[i, j] = np.mean(np.arccos(np.clip(cos64(last[i], last[j]), -1, 1)) / np.pi)
  return sub, block, angular


@pytest.fixture(scope="module")
def tiny():
  cfg, params, tokens = R.tiny_model()
  # Three sequences, so that a batch of 2 needs padding (the padded copy must not count).
  tokens = np.concatenate([tokens, tokens[:1, ::-1]])
  return Llama.from_params(cfg, params), tokens


@pytest.mark.parametrize("batch_size", [1, 2])
def test_similarities_match_a_plain_computation(tiny, batch_size):
  model, tokens = tiny
  sim = baselines.similarities(model, tokens, batch_size=batch_size)
  sub, block, angular = reference_similarities(model, tokens)
  assert np.ptp(sub) > 0.1 and np.ptp(block) > 0.1  # the statistics tell sublayers apart
  np.testing.assert_allclose(sim.sublayer_cosine, sub, atol=1e-5)
  np.testing.assert_allclose(sim.block_cosine, block, atol=1e-5)
  np.testing.assert_allclose(sim.angular, angular, atol=1e-4)


def test_similarity_orderings(tiny):
  model, tokens = tiny
  sim = baselines.similarities(model, tokens)
  sub, block, angular = reference_similarities(model, tokens)
  L = model.config.num_layers

  # ShortGPT: every block, by block influence 1 - cos, lowest first.
  steps = R.as_json(baselines.shortgpt_steps(sim))
  assert [s["block"] for s in steps] == list(np.argsort(1 - block, kind="stable"))
  assert all(s["kind"] == "block" and s["sublayers"] == [2 * s["block"], 2 * s["block"] + 1]
             for s in steps)
  np.testing.assert_allclose([s["score"] for s in steps], np.sort(1 - block), atol=1e-5)

  # LLM-Drop: attention sublayers only; the joint variant ranks every sublayer.
  attn = R.as_json(baselines.llm_drop_steps(sim))
  assert [s["sublayer"] for s in attn] == [2 * l for l in np.argsort(1 - sub[:, 0], kind="stable")]
  joint = R.as_json(baselines.llm_drop_steps(sim, joint=True))
  assert [s["sublayer"] for s in joint] == list(np.argsort(1 - sub.reshape(-1), kind="stable"))

  # Gromov et al.: for every n, the contiguous run of n blocks with the least distance.
  for n in range(1, L + 1):
    distances = [angular[l, l + n] for l in range(L - n + 1)]
    first, distance = baselines.gromov_run(sim, n)
    assert first == int(np.argmin(distances)), n
    assert distance == pytest.approx(min(distances), abs=1e-4)
    assert [s["block"] for s in R.as_json(baselines.gromov_steps(sim, n))] == list(
        range(first, first + n))


def test_units_removed_and_bad_ratios():
  get = baselines.get_method
  assert baselines.units_removed(get("finercut"), 0.25, 30) == 15
  # Block methods: the nearest whole-block count (3.75 -> 4, 7.5 -> 8, 11.25 -> 11).
  assert [baselines.units_removed(get("sleb"), r, 30) for r in (0.125, 0.25, 0.375)] == [4, 8, 11]
  with pytest.raises(ValueError, match="rounds to zero whole blocks"):
    baselines.units_removed(get("shortgpt"), 0.01, 30)
  with pytest.raises(ValueError, match="attention sublayers only"):
    baselines.units_removed(get("llm_drop"), 0.6, 30)
  with pytest.raises(ValueError, match="unknown method 'shortgtp'"):
    jobs.parse_methods("finercut,shortgtp")
  assert jobs.parse_methods("all") == list(baselines.METHODS)
  # Random orders: seeded, a permutation of every unit.
  a, b = (R.as_json(baselines.random_steps(4, "sublayers", s)) for s in (0, 1))
  assert sorted(s["sublayer"] for s in a) == list(range(8))
  assert [s["sublayer"] for s in a] != [s["sublayer"] for s in b]
  assert a == R.as_json(baselines.random_steps(4, "sublayers", 0))


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  """One comparison of every method on a tiny checkpoint (2 ratios, 2 seeds, 2 tasks)."""
  import test_main
  root = tmp_path_factory.mktemp("compare")
  model_dir = save_hf_model(make_hf_model("gqa_tied", seed=3, num_layers=4,
                                          initializer_range=0.3), root / "model")
  make_tokenizer(model_dir)
  text = root / "calibration.txt"
  text.write_text("\n".join(test_main.text_lines(80)) + "\n")
  config = test_main.job_config(model_dir, str(text), root / "run")
  config.eval.tasks = "arc_easy,piqa"
  config.eval.perplexity.num_tokens = 64
  out = str(root / "comparison")
  logs = []
  result = jobs.run_comparison(config, ratios=(0.25, 0.5), seeds=(0, 1), limit=4,
                               comparison_dir=out, log=logs.append)
  return config, out, result, logs


def test_comparison_outputs(comparison):
  config, out, result, _ = comparison
  for name in ("comparison.json", "comparison.md", "accuracy_vs_ratio.png",
               "perplexity_vs_ratio.png", "layer_maps.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert set(result["methods"]) == set(baselines.METHODS)
  cfg = loading.load_config(config.model.path)
  L = cfg.num_layers
  for name, method in baselines.METHODS.items():
    d = os.path.join(out, name)
    ranking = json.load(open(os.path.join(d, "ranking.json")))
    masks = json.load(open(os.path.join(d, "masks.json")))
    assert np.array_equal(np.load(os.path.join(d, "calibration_tokens.npy")),
                          np.load(os.path.join(out, "calibration_tokens.npy")))
    assert os.path.getsize(os.path.join(d, "layer_map.png")) > 0
    for ratio in ("0.25", "0.5"):
      keep = np.asarray(masks[ratio], bool)
      n = baselines.units_removed(method, float(ratio), L)
      removed = int((~keep).sum())
      assert removed == (2 * n if method.unit == "blocks" else n), (name, ratio)
      if method.unit == "blocks":  # whole blocks only
        assert np.all(keep[:, 0] == keep[:, 1]), name
      if name == "llm_drop":
        assert keep[:, 1].all()
      if name != "gromov":  # nested prefixes of the ranking
        want = [s for st in ranking["steps"][:n] for s in st["sublayers"]]
        assert sorted(np.flatnonzero(~keep.reshape(-1))) == sorted(want), (name, ratio)
      model, _ = checkpoint.load_pruned(d, float(ratio))
      assert np.array_equal(model.present, keep), (name, ratio)
      summary = result["methods"][name]["ratios"][ratio]
      assert summary["removed_sublayers"] == removed
      assert summary["perplexity"] > 0
      assert set(summary["benchmarks"]) == {"arc_easy", "piqa"}
  # The random methods ran each seed in its own run directory, and report the spread.
  assert os.path.isfile(os.path.join(out, "random_blocks", "seed_1", "masks.json"))
  assert result["methods"]["random_sublayers"]["ratios"]["0.5"]["seeds"] == 2
  text = open(os.path.join(out, "comparison.md")).read()
  assert "## Ratio 0.25" in text and "| shortgpt |" in text and "| dense |" in text


def test_search_baselines_match_brute_force(comparison):
  """SLEB (blocks) and BlockPruner (sublayers) by calibration perplexity, and FinerCut, against
  the brute-force greedy loop on the same checkpoint and tokens."""
  config, out, _, _ = comparison
  cfg, params = loading.load_params(config.model.path)
  tokens = np.load(os.path.join(out, "calibration_tokens.npy"))
  for name, metric, kind in (("sleb", "ppl", "blocks"), ("blockpruner", "ppl", "sublayers"),
                             ("finercut", "js", "sublayers")):
    ranking = json.load(open(os.path.join(out, name, "ranking.json")))
    n = len(ranking["steps"])
    removed, scores, _, _ = R.reference_greedy(metric, params, cfg, tokens, kind, num_steps=n)
    assert [tuple(s["sublayers"]) for s in ranking["steps"]] == removed, name
    R.assert_scores_close([s["score"] for s in ranking["steps"]], scores, 1e-4, name)


def test_similarity_baselines_on_the_checkpoint(comparison):
  config, out, _, _ = comparison
  cfg, params = loading.load_params(config.model.path)
  tokens = np.load(os.path.join(out, "calibration_tokens.npy"))
  sub, block, angular = reference_similarities(Llama.from_params(cfg, params), tokens)
  shortgpt = json.load(open(os.path.join(out, "shortgpt", "ranking.json")))
  assert [s["block"] for s in shortgpt["steps"]] == list(np.argsort(1 - block, kind="stable"))
  gromov = json.load(open(os.path.join(out, "gromov", "ranking.json")))
  for ratio, run in gromov["runs"].items():
    n = run["num_blocks"]
    assert run["first_block"] == int(np.argmin([angular[l, l + n]
                                                for l in range(cfg.num_layers - n + 1)]))


def test_comparison_rerun_reuses_and_refuses_other_inputs(comparison, tmp_path):
  config, out, result, _ = comparison
  stamp = {name: os.path.getmtime(os.path.join(out, name, "ranking.json"))
           for name in baselines.METHODS}
  logs = []
  again = jobs.run_comparison(config, ratios=(0.25, 0.5), seeds=(0, 1), limit=4,
                              comparison_dir=out, log=logs.append)
  assert again["methods"] == result["methods"]
  assert {name: os.path.getmtime(os.path.join(out, name, "ranking.json"))
          for name in baselines.METHODS} == stamp
  assert sum("reusing" in line for line in logs) >= len(baselines.METHODS)

  before = sorted(os.listdir(out))
  other_tokens = json.loads(config.to_json())
  config2 = type(config)(other_tokens)
  config2.data.seq_len = 12
  with pytest.raises(jobs.ComparisonError, match="other calibration tokens"):
    jobs.run_comparison(config2, ratios=(0.25,), methods=["shortgpt"], limit=4, comparison_dir=out)
  other_model = save_hf_model(make_hf_model("gqa_tied", seed=4, num_layers=4), tmp_path / "m")
  make_tokenizer(other_model)
  config3 = type(config)(json.loads(config.to_json()))
  config3.model.path = other_model
  with pytest.raises(jobs.ComparisonError, match="another model"):
    jobs.run_comparison(config3, ratios=(0.25,), methods=["shortgpt"], limit=4, comparison_dir=out)
  assert sorted(os.listdir(out)) == before
  with pytest.raises(ValueError, match="rounds to zero whole blocks"):
    jobs.run_comparison(config, ratios=(0.05,), methods=["sleb"], limit=4,
                comparison_dir=str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")
