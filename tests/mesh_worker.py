"""Runs greedy searches of the tiny model on several meshes and backends; one JSON line each.

Used by test_scorer.py in a subprocess with 8 simulated CPU devices: a collective that deadlocks
on a mesh makes XLA abort the whole process, which must fail one test, not kill the test session.

  python tests/mesh_worker.py OUT.jsonl CAND,MODEL,WIDTH,BACKEND[,FAMILY] ...

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
from finercut_jax.model import Llama  # noqa: E402
from finercut_jax.scorer import Scorer  # noqa: E402
from finercut_jax.search import SearchSpec, greedy_search  # noqa: E402
from finercut_jax.sharding import make_mesh  # noqa: E402


def main(out_path, specs):
  assert len(jax.devices()) == 8, jax.devices()
  with open(out_path, "w") as out:
    for spec in specs:
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
        steps = greedy_search(scorer, SearchSpec(num_layers=cfg.num_layers))
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
