"""One process of a multi-process job on this machine; test_distributed.py starts N of them.

  python tests/multiprocess_worker.py SPEC_JSON

SPEC: `config` (flattened overrides of the base config), `devices` (CPU devices of this process),
`num_processes`, `process_id`, `port` (the coordinator on localhost), and optionally
`kill_at_step` (this process SIGKILLs itself once that greedy step is recorded) and `evaluate`
(run `finercut_jax.evaluate` on the run directory instead of the search).
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

from finercut_jax import main, search  # noqa: E402
from finercut_jax.defaults import base_config  # noqa: E402


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
        if record["step"] == kill:
          os.kill(os.getpid(), signal.SIGKILL)
      return original(*args, on_step=step, **kwargs)

    search.greedy_search = greedy_search
  try:
    main.run(config)
  except (ValueError, FileNotFoundError) as e:  # as the CLI does
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
