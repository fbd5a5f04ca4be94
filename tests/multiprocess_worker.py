"""One process of a multi-process job on this machine; test_distributed.py starts N of them.

  python tests/multiprocess_worker.py SPEC_JSON

SPEC: `config` (flattened overrides of the base config), `devices` (CPU devices of this process),
`num_processes`, `process_id`, `port` (the coordinator on localhost), and optionally
`kill_at_step` (this process SIGKILLs itself once that greedy step is recorded) or `kill_at`
(a point of the job, below, where it SIGKILLs itself: the faults of test_reliability.py).
"""
import json
import os
import signal
import sys

spec = json.loads(sys.argv[1])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = str(spec["devices"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from finercut_jax import jobs, search  # noqa: E402
from finercut_jax.jobs.settings import base_config  # noqa: E402


def die():
  os.kill(os.getpid(), signal.SIGKILL)


def _arm(point):
  """SIGKILL at `point`: mid_step (inside the second device program of the search), before_save
  (the old checkpoint metadata removed, Orbax not yet started), mid_save (Orbax writing),
  before_metadata (parameters committed, model.json not yet written), mid_evaluation (the
  second model's benchmarks)."""
  import orbax.checkpoint as ocp

  from finercut_jax.evaluation import harness_tasks
  from finercut_jax.model import checkpoint
  from finercut_jax.scoring import scorer
  calls = {"n": 0}

  def nth(n, original):
    def wrapped(*args, **kwargs):
      calls["n"] += 1
      if calls["n"] == n:
        die()
      return original(*args, **kwargs)
    return wrapped

  if point == "mid_step":
    scorer.Scorer._run = nth(2, scorer.Scorer._run)
  elif point == "before_save":
    ocp.StandardCheckpointer.save = nth(1, ocp.StandardCheckpointer.save)
  elif point == "mid_save":
    ocp.StandardCheckpointer.wait_until_finished = nth(
        1, ocp.StandardCheckpointer.wait_until_finished)
  elif point == "before_metadata":
    original = checkpoint.atomic_write_json
    checkpoint.atomic_write_json = lambda path, obj: (
        die() if path.endswith("model.json") else original(path, obj))
  elif point == "mid_evaluation":
    harness_tasks.evaluate_tasks = nth(2, harness_tasks.evaluate_tasks)
  else:
    raise ValueError(f"unknown kill point {point}")


def run():
  config = base_config()
  config.update_from_flattened_dict(spec["config"])
  if spec["num_processes"] > 1:
    config.distributed.coordinator_address = f"localhost:{spec['port']}"
    config.distributed.num_processes = spec["num_processes"]
    config.distributed.process_id = spec["process_id"]
  kill = spec.get("kill_at_step")
  if kill is not None:
    original = search.greedy_search

    def greedy_search(*args, on_step=None, **kwargs):
      def step(record):
        on_step(record)
        if record.step == kill:
          os.kill(os.getpid(), signal.SIGKILL)
      return original(*args, on_step=step, **kwargs)

    search.greedy_search = greedy_search
  if spec.get("kill_at"):
    _arm(spec["kill_at"])
  try:
    jobs.run_pruning(config)
  except (ValueError, FileNotFoundError) as e:  # as the CLI does
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
