"""Runs greedy searches of the tiny model on several meshes and backends; one JSON line each.

Used by test_scorer.py in a subprocess with 8 simulated CPU devices: a collective that deadlocks
on a mesh makes XLA abort the whole process, which must fail one test, not kill the test session.

  python tests/mesh_worker.py OUT.jsonl CAND,MODEL,WIDTH,BACKEND[,FAMILY] ... [shared_bound]

FAMILY is the tiny model's family (finercut_ref.CONFIGS: llama, the default, or mixtral).
"""
import json
import os
import sys
import time
import traceback

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import finercut_ref as R  # noqa: E402
from finercut_jax.model.modules import Llama  # noqa: E402
from finercut_jax.parallel.sharding import make_mesh  # noqa: E402
from finercut_jax.scoring.planner import passes  # noqa: E402
from finercut_jax.scoring.scorer import Scorer  # noqa: E402
from finercut_jax.search.greedy import SearchSpec, greedy_search  # noqa: E402


def shared_bound() -> dict:
  """One step-program call on 2 candidate devices: device 0's first chunk completes a candidate;
  device 1's second chunk holds one with a lower score, from a partial score of 0 (it runs to the
  end) or of 1e6, above device 0's score. Only a best score shared across devices after each
  chunk stops the latter (device 1's own best is still inf)."""
  import numpy as np

  from finercut_jax.scoring.scorer import Candidate, StepStats
  cfg, params, tokens = R.tiny_model()
  scorer = Scorer(Llama.from_params(cfg, params), tokens, metric="js",
                  position_block=R.POSITION_BLOCK, mesh=make_mesh(2, 1), max_candidates=4)
  keep = np.ones(cfg.num_sublayers, bool)
  # Device 0 (the first slot) gets the candidate with the higher score, so that device 1's runs
  # to the end when nothing but the bound stops it.
  candidates = [Candidate(10, 11), Candidate(2, 3)]
  order = np.argsort(-R.reference_scores("js", params, cfg, tokens, keep.reshape(-1, 2), candidates))
  candidates = [candidates[i] for i in order]
  exact, _ = scorer.score(keep.reshape(-1, 2), candidates)
  slots = scorer.planner.slots(candidates)
  result = {"exact": exact.tolist(), "devices": (slots % 2).tolist()}
  for partial in (0.0, 1e6):
    _, plan = scorer.planner.layout(candidates, slots, np.asarray([0.0, partial]),
                                    np.arange(2), passes(1, False, 1)[0])
    # Device 1: its candidate moves to the second chunk, after device 0's first one.
    plan = type(plan)(*(np.concatenate([a[:1], a[1:, ::-1]]) for a in plan))
    done, scores = scorer._run(True, keep, (0, tokens.shape[0]), np.inf, plan,
                               StepStats(0, 0, 0.0, 0.0))
    result[str(partial)] = {"done": done[:, :, 0].tolist(), "scores": scores[:, :, 0].tolist(),
                            "valid": plan.valid[:, :, 0].tolist()}
  return result


def main(out_path, specs):
  assert len(jax.devices()) == 8, jax.devices()
  with open(out_path, "w") as out:
    for spec in specs:
      if spec == "shared_bound":
        try:
          record = {"config": spec, **shared_bound()}
        except Exception:
          record = {"config": spec, "error": traceback.format_exc()}
        out.write(json.dumps(record) + "\n")
        out.flush()
        continue
      cand, model, width, backend, family = (spec + ",llama").split(",")[:5]
      cfg, params, tokens = R.tiny_model(family=family)
      # Announced first: if the process dies in this config, the test names it.
      out.write(json.dumps({"config": spec, "started": True}) + "\n")
      out.flush()
      begin = time.perf_counter()
      try:
        settings = dict(metric="js", chunk_width=int(width), position_block=R.POSITION_BLOCK,
                        mesh=make_mesh(int(cand), int(model)), backend=backend,
                        max_candidates=2 * cfg.num_layers)
        scorer = Scorer(Llama.from_params(cfg, params), tokens, **settings)
        steps = R.as_json(greedy_search(scorer, SearchSpec(num_layers=cfg.num_layers)))
        # The abstract scorer (ahead-of-time sizing) must lower the same sharded programs.
        abstract_matches = None
        if backend == "jit":
          abstract = Scorer(Llama.from_params(cfg, R.abstract_params(params)), tokens, **settings)
          ours, theirs = abstract.lower(), scorer.lower()
          abstract_matches = all(ours[k].as_text() == theirs[k].as_text() for k in theirs)
      except Exception:  # reported by this config's test; the other configs still run
        out.write(json.dumps({"config": spec, "error": traceback.format_exc()}) + "\n")
        out.flush()
        continue
      # Which parameters the scorer holds split over devices (tensor parallelism).
      held = getattr(scorer, "params", None)
      split = None if held is None else sorted(
          jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(held)[0]
          if x.addressable_shards[0].data.shape != x.shape)
      out.write(json.dumps({"config": spec, "digest": R.params_digest(params, tokens),
                            "seconds": time.perf_counter() - begin, "split_params": split,
                            "abstract_matches": abstract_matches,
                            "steps": steps}) + "\n")
      out.flush()


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
