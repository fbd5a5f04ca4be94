"""The scorer against the plain reference of finercut_ref.py, on one device and on meshes.

Tolerance 1e-5 relative on scores: the scorer and the reference run the same float32 model, but
the scorer restarts candidates from cached prefixes and kept states, vmaps them, and fuses the LM
head and the divergence per block of positions in float32, while the reference runs every
candidate's full forward pass and the divergence in float64. Measured disagreement is <= 2e-6
relative for every metric (angular, whose arccos amplifies rounding, is the worst); the scores
are O(1e-4..10) by metric (std-0.3 weights), so a real error (a wrong mask, a skipped or repeated sublayer,
a misaligned position block, a wrong reduction) moves them by 1e-2 relative or more.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import finercut_ref as R
from finercut_jax.model.modules import Llama
from finercut_jax.parallel.sharding import make_mesh
from finercut_jax.scoring.scorer import Candidate, Scorer
from finercut_jax.search.greedy import SearchSpec, greedy_search

RTOL = 1e-5
L = R.TINY.num_layers


def sublayer_candidates(keep):
  flat = np.asarray(keep, bool).reshape(-1)
  return [Candidate(s, s + 1) for s in range(2 * L) if flat[s]]


def block_candidates():
  return [Candidate(2 * b, 2 * b + 2) for b in range(L)]


def dense():
  return np.ones((L, 2), bool)


def mask_without(*sublayers):
  return R.without(dense(), sublayers)


# Calls in an order that exercises the scorer's caches: a fresh mask, a mask that removes more
# (the incremental path), masks that put sublayers back (caches must be dropped), block
# candidates (two sublayers at once, including a block whose attention is already gone), every
# attention removed, and candidates passed out of sublayer order.
def scoring_calls():
  rng = np.random.default_rng(1)
  shuffled = [sublayer_candidates(dense())[i] for i in rng.permutation(2 * L)]
  pruned = mask_without(1, 4, 9)
  more = mask_without(1, 4, 9, 7)
  no_attn = mask_without(*range(0, 2 * L, 2))
  return [
      ("dense, every sublayer, shuffled", dense(), shuffled),
      ("3 removed", pruned, sublayer_candidates(pruned)),
      ("one more removed", more, sublayer_candidates(more)[::-1]),
      ("one more removed, blocks", more, block_candidates()),
      ("dense again, blocks", dense(), block_candidates()),
      ("no attention, FFN candidates", no_attn, sublayer_candidates(no_attn)),
      ("3 removed again, a subset", pruned, sublayer_candidates(pruned)[2:7]),
  ]


@pytest.mark.parametrize("metric", R.METRICS)
def test_scores_match_reference(metric):
  cfg, params, tokens = R.tiny_model()
  scorer = R.shared_scorer(metric)
  for what, keep, candidates in scoring_calls():
    scores, stats = scorer.score(keep, candidates)
    want = R.reference_scores(metric, params, cfg, tokens, keep, candidates)
    # js_official averages over vocabulary elements too: its scores are V times smaller.
    floor = 1e-3 / (cfg.vocab_size if metric == "js_official" else 1)
    assert np.all(want > floor), f"{what}: reference scores too small to test anything: {want}"
    R.assert_scores_close(scores, want, RTOL, f"{metric}, {what}")
    assert stats.naive_evaluations == len(candidates) * 2 * L * R.N
    assert 0 < stats.evaluations and stats.seconds > 0
    assert stats.sequence_fraction == 1.0  # score() computes every sequence of every candidate


def test_mixtral_scores_match_reference():
  """The tiny Mixtral (mixture-of-experts FFN sublayers) through the same calls: the scorer's
  prefix reuse, kept states and vmapped candidates route every token as a full forward does."""
  cfg, params, tokens = R.tiny_model(family="mixtral")
  scorer = R.shared_scorer("js", "mixtral")
  for what, keep, candidates in scoring_calls():
    scores, _ = scorer.score(keep, candidates)
    want = R.reference_scores("js", params, cfg, tokens, keep, candidates)
    assert np.all(want > 1e-3), f"{what}: reference scores too small to test anything: {want}"
    R.assert_scores_close(scores, want, RTOL, f"mixtral, {what}")


@pytest.mark.parametrize("states", [3, 0])
def test_state_memory_budget(states):
  """A budget for 3 kept states per candidate slot coarsens them to every 4th boundary (of 12);
  a budget of 0 keeps none. Either way the greedy ordering and scores stay exact."""
  cfg, params, tokens = R.tiny_model()
  one_state = tokens.size * cfg.hidden_size * 4  # float32 N*T*D
  scorer = Scorer(Llama.from_params(cfg, params), tokens, metric="js", position_block=R.POSITION_BLOCK,
                  mesh=make_mesh(1, 1), state_memory=states * one_state * 2 * L)
  assert scorer.num_states == states and scorer.states.nbytes == states * one_state * 2 * L
  if states:
    assert scorer.state_every == 4
  steps = R.as_json(greedy_search(scorer, SearchSpec(num_layers=L, num_steps=4)))
  first_steps = tuple(x[:4] for x in R.shared_reference_greedy("js"))
  R.check_search(steps, first_steps, RTOL, f"{states} states")


def test_bad_calls_are_refused():
  scorer = R.shared_scorer("js")
  with pytest.raises(ValueError, match="candidates"):
    scorer.score(dense(), [])
  with pytest.raises(ValueError, match="13 candidates"):  # more than its 12 slots
    scorer.score(dense(), sublayer_candidates(dense()) + [Candidate(0, 2)])
  cfg, params, tokens = R.tiny_model()
  with pytest.raises(ValueError, match="metric"):
    Scorer(Llama.from_params(cfg, params), tokens, metric="bogus")
  with pytest.raises(ValueError, match="backend"):
    Scorer(Llama.from_params(cfg, params), tokens, backend="bogus")
  with pytest.raises(ValueError, match="pmap"):
    Scorer(Llama.from_params(cfg, params), tokens, backend="pmap", mesh=make_mesh(4, 2))


def test_step_accounting():
  """Prefix reuse halves a step: with chunk width 1 on one device, step 1 of a full search on the
  dense model runs the prefix pass (2L sublayers) plus, for candidate s, the sublayers after s:
  2L + 2L(2L-1)/2 = 78 of the naive 2L*2L = 144 per sequence (0.54 for L=6; the bound 0.55 needs
  L >= 5), before early termination skips the second sequence of hopeless candidates."""
  records = R.shared_search("js")
  first = records[0]["stats"]
  assert first["naive_evaluations"] == (2 * L) ** 2 * R.N
  assert first["evaluations"] <= 0.55 * first["naive_evaluations"], first
  assert first["evaluation_fraction"] <= 0.55
  # Early termination: exactly the candidates reported as lower bounds stopped, each after its
  # first sequence (of R.N = 2), skipping the second one's sublayers and LM head.
  stopped = len(records[0]["lower_bounds"])
  assert R.N == 2 and stopped > 0, records[0]
  assert first["sequence_fraction"] == pytest.approx(1 - stopped / (2 * L * R.N)), first
  for r in records[1:]:
    assert r["stats"]["evaluations"] <= first["evaluations"], (r["step"], r["stats"])
    assert r["stats"]["naive_evaluations"] == (2 * L - r["step"]) * 2 * L * R.N


# ----------------------------------------------------------------------------- meshes

# (cand, model, chunk width, backend). Per cand-device the 12 candidate slots are 2 (8x1),
# 3 (4x2) and 6 (2x4): width 3 divides 3, width 4 does not divide 6, width 3 exceeds 2; and the
# candidate count shrinks from 12 to 1 over the search, so every width > 1 meets counts it does
# not divide. The model axis splits heads (8 and 4), FFN units (32) and vocab (64) evenly.
# The tiny Mixtral runs with its experts' FFN units split over a 4-way model axis, and on 8
# candidate devices, against its own references.
MESH_CONFIGS = ["8,1,1,jit", "4,2,3,jit", "2,4,4,jit", "8,1,3,pmap", "8,1,2,jit,mixtral",
                "2,4,3,jit,mixtral"]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  """Runs the searches of MESH_CONFIGS in a subprocess with 8 CPU devices (see mesh_worker.py)."""
  out = tmp_path_factory.mktemp("meshes") / "results.jsonl"
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mesh_worker.py")
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(worker)),
                                         os.environ.get("PYTHONPATH", "")]))
  try:
    proc = subprocess.run([sys.executable, worker, str(out), *MESH_CONFIGS, "shared_bound"], env=env,
                          capture_output=True, text=True, timeout=400)
    failure = None if proc.returncode == 0 else (
        f"mesh worker exited {proc.returncode}: " + proc.stderr[-3000:])
  except subprocess.TimeoutExpired as e:
    failure = f"mesh worker timed out: {str(e.stderr)[-3000:]}"
  results = {}
  if out.exists():
    for line in out.read_text().splitlines():
      record = json.loads(line)
      results.setdefault(record["config"], {}).update(record)
  return results, failure


@pytest.mark.parametrize("config", MESH_CONFIGS)
def test_mesh_matches_one_device_and_reference(config, mesh_results):
  results, failure = mesh_results
  record = results.get(config)
  assert record is not None, f"{config}: not reached; {failure}"
  assert "error" not in record, f"{config}: {record['error']}"
  assert "steps" in record, f"{config}: the worker hung or crashed in it; {failure}"
  family = (config + ",llama").split(",")[4]
  cfg, params, tokens = R.tiny_model(family=family)
  assert record["digest"] == R.params_digest(params, tokens), "worker built a different model"
  if record.get("split_params") is not None:  # the scorer's parameters, if it exposes them
    split = record["split_params"]
    if config.split(",")[1] == "1":
      assert split == [], f"{config}: parameters split without a model axis: {split}"
    else:  # every weight matrix splits its heads, FFN units or vocabulary over the model axis
      assert len(split) == 9 and not any("norm" in name for name in split), split
  if config.endswith(",jit"):
    assert record["abstract_matches"], f"{config}: the abstract scorer lowers other programs"
  steps = record["steps"]
  # The same ordering and scores as the plain reference...
  R.check_search(steps, R.shared_reference_greedy("js", family=family), RTOL, config)
  # ...and as the one-device scorer (1e-5 relative: the same float32 program on different
  # device splits may round differently; any ordering difference fails).
  one = R.shared_search("js", family=family)
  assert [r["sublayers"] for r in steps] == [r["sublayers"] for r in one]
  R.assert_scores_close([r["score"] for r in steps], [r["score"] for r in one], RTOL,
                        f"{config} vs 1 device")


def test_best_score_is_shared_across_devices(mesh_results):
  """The step program shares the best complete score over the candidate axis after every chunk
  (see mesh_worker.shared_bound): a candidate on device 1 whose partial score exceeds the score
  device 0 just completed does not run, though device 1 itself has completed nothing."""
  results, failure = mesh_results
  record = results.get("shared_bound")
  assert record is not None, f"not reached; {failure}"
  assert "error" not in record, record["error"]
  n = R.N
  assert record["devices"] == [0, 1]
  ran, stopped = record["0.0"], record["1000000.0"]
  # Device 0's candidate (chunk 0) completes in both calls, with its exact score.
  for call in (ran, stopped):
    assert call["valid"] == [[True, False], [False, True]]
    assert call["done"][0][0] == n
    np.testing.assert_allclose(call["scores"][0][0], record["exact"][0], rtol=1e-6)
  # Device 1's candidate (chunk 1): runs from a partial score of 0, giving its exact score...
  assert ran["done"][1][1] == n
  np.testing.assert_allclose(ran["scores"][1][1], record["exact"][1], rtol=1e-6)
  # ...and not at all from a partial score above device 0's complete one.
  assert stopped["done"][1][1] == 0 and stopped["scores"][1][1] == 1e6


def test_compilation_cache_is_reused(tmp_path):
  """With the persistent compilation cache on, a second process (a resumed or repeated job) loads
  the step program from the cache instead of compiling it."""
  script = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import jax, numpy as np
from jax._src import monitoring
import finercut_ref as R
from finercut_jax.model.modules import Llama
from finercut_jax.scoring.scorer import Candidate, Scorer, enable_compilation_cache
enable_compilation_cache({str(tmp_path / "cache")!r}, min_compile_seconds=0)
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                   if event == "/jax/compilation_cache/cache_hits" else None)
cfg, params, tokens = R.tiny_model()
scorer = Scorer(Llama.from_params(cfg, params), tokens, position_block=R.POSITION_BLOCK)
keep = np.ones((cfg.num_layers, 2), bool)
_, _, stats = scorer.score_step(keep, [Candidate(s, s + 1) for s in range(2 * cfg.num_layers)])
print(json.dumps({{"hits": len(hits), "compile_seconds": stats.compile_seconds}}))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert runs[0]["hits"] == 0 and runs[0]["compile_seconds"] > 0, runs
  assert any(p.name.startswith("jit_per_device") for p in (tmp_path / "cache").iterdir())
  assert runs[1]["hits"] >= 1, runs  # the step program (and the others) came from the cache


def test_abstract_scorer_lowers_the_same_programs():
  """A scorer over abstract parameters (how a 70B model is sized ahead of time, see
  benchmarks/aot_memory.py) allocates nothing and lowers exactly the concrete scorer's programs;
  the compiled step's arguments are the arrays the concrete scorer holds."""
  cfg, params, tokens = R.tiny_model()
  kwargs = dict(metric="js", chunk_width=2, max_candidates=2 * L)
  concrete = Scorer(Llama.from_params(cfg, params), tokens, **kwargs)
  abstract = Scorer(Llama.from_params(cfg, R.abstract_params(params)), tokens, **kwargs)
  assert abstract.abstract and not concrete.abstract
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(
      (abstract.params, abstract.prefix, abstract.states, abstract.reference)))
  ours, theirs = abstract.lower(), concrete.lower()
  assert set(ours) == {"reference", "prefix", "step"}
  for name in ours:
    assert ours[name].as_text() == theirs[name].as_text(), name
  # Its arguments: at least the caches and layer weights, at most everything the scorer holds
  # (jit drops unused ones, e.g. `targets` for js) plus the per-chunk index arrays.
  nbytes = lambda *xs: sum(x.nbytes for x in jax.tree.leaves(xs))
  used = nbytes(concrete.prefix, concrete.states, concrete.reference, concrete.params["layers"])
  held = nbytes(concrete.params, concrete.prefix, concrete.states, concrete.reference,
                concrete.targets, concrete.weights)
  stats = ours["step"].compile().memory_analysis()
  assert used <= stats.argument_size_in_bytes <= held + 4096
  with pytest.raises(ValueError, match="abstract"):
    abstract.score(dense(), sublayer_candidates(dense()))
