"""The job as several cooperating processes on this machine, as on a TPU pod slice or GPU cluster.

Each process is a subprocess (tests/multiprocess_worker.py) with its own CPU devices, joined by
`jax.distributed` over localhost with gloo CPU collectives; a hang or crash fails one test, not the
session. Every configuration has the same global mesh (4 devices: 2 candidate x 2 model), so the
model axis spans processes in the 4-process run and the arithmetic is the same everywhere: the
ordering, masks and checkpoints must be identical to one process, and the scores equal to float32
rounding of the cross-process reductions (measured: identical).
"""
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.processes import free_port, wait_all
from finercut_jax.model import checkpoint
from finercut_jax.rundir import RunDir
from test_main import job_assets, job_config  # noqa: F401  (the tiny checkpoint fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
TIMEOUT = 600
DEVICES = 4


def overrides(config) -> dict:
  flat = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      elif v is not None:
        flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  walk(config.to_dict(), "")
  return flat


def start(config, num_processes, *, per_process=None, kill=None, kill_at=None):
  """Starts the job as `num_processes` processes; `per_process[i]` overrides process i's config;
  `kill=(i, step)` SIGKILLs process i after that greedy step, `kill_at=(i, point)` at a point of
  the job (multiprocess_worker.py lists them)."""
  port = free_port()
  procs = []
  for i in range(num_processes):
    cfg = dict(overrides(config), **(per_process or {}).get(i, {}))
    spec = {"config": cfg, "devices": DEVICES // num_processes, "num_processes": num_processes,
            "process_id": i, "port": port}
    if kill is not None and kill[0] == i:
      spec["kill_at_step"] = kill[1]
    if kill_at is not None and kill_at[0] == i:
      spec["kill_at"] = kill_at[1]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def finish(procs, timeout=TIMEOUT):
  """Waits for every process; returns (exit codes, outputs). Kills all at the timeout."""
  outputs, _ = wait_all(procs, timeout)
  return [p.returncode for p in procs], outputs


def run_job(config, num_processes, **kwargs):
  codes, outputs = finish(start(config, num_processes, **kwargs))
  assert codes == [0] * num_processes, "\n\n".join(o[-3000:] for o in outputs)
  return outputs


def results(run_dir):
  """What must not depend on the process count: the ordering with every candidate's score, masks,
  the pruned checkpoints' logits on the calibration tokens, the evaluation."""
  read = lambda name: json.loads((run_dir / name).read_text())
  state = read("search_state.json")
  steps = [{k: r[k] for k in ("step", "sublayer", "kind", "block", "score", "scores",
                                "lower_bounds")} for r in state["steps"]]
  tokens = np.load(run_dir / "calibration_tokens.npy")
  logits = {}
  for ratio in read("masks.json"):
    model, _ = checkpoint.load_pruned(str(run_dir), float(ratio))
    logits[ratio] = np.asarray(model(jnp.asarray(tokens)))
  evaluation = read("eval_results.json")["models"] if (run_dir / "eval_results.json").exists() else {}
  for entry in evaluation.values():
    entry.pop("seconds", None)
    for name in ("throughput", "throughput_vs_dense"):
      entry.pop(name, None)
    for task in entry["benchmarks"].values():
      task.pop("seconds")
  return {"steps": steps, "masks": read("masks.json"), "logits": logits, "eval": evaluation,
          "tokens": tokens}


def assert_same(got, want, what):
  assert [s["sublayer"] for s in got["steps"]] == [s["sublayer"] for s in want["steps"]], what
  for a, b in zip(got["steps"], want["steps"]):
    assert a["lower_bounds"] == b["lower_bounds"], what
    assert sorted(a["scores"]) == sorted(b["scores"]), what
    np.testing.assert_allclose([a["scores"][k] for k in sorted(a["scores"])],
                               [b["scores"][k] for k in sorted(b["scores"])], rtol=1e-6,
                               err_msg=what)
  assert got["masks"] == want["masks"], what
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  for ratio, logits in want["logits"].items():
    np.testing.assert_allclose(got["logits"][ratio], logits, rtol=1e-6, atol=1e-6, err_msg=what)
  if not got["eval"]:  # a run without evaluation
    return
  assert got["eval"].keys() == want["eval"].keys(), what
  for key, entry in want["eval"].items():
    np.testing.assert_allclose(got["eval"][key]["perplexity"]["perplexity"],
                               entry["perplexity"]["perplexity"], rtol=1e-6, err_msg=what)
    assert got["eval"][key]["benchmarks"] == entry["benchmarks"], what


def distributed_config(model_dir, text, run_dir):
  c = job_config(model_dir, text, run_dir)
  c.scorer.mesh_cand = 0
  c.scorer.mesh_model = 2
  c.eval.enabled = True
  c.eval.tasks = "arc_easy,piqa"
  c.eval.limit = 2
  c.eval.perplexity.num_tokens = 64
  c.eval.throughput.repeats = 1
  c.eval.throughput.prompt_len = 8
  c.eval.throughput.decode_steps = 2
  c.eval.plots = False
  return c


@pytest.fixture(scope="module")
def one_process(job_assets, tmp_path_factory):
  model_dir, _, text = job_assets
  run_dir = tmp_path_factory.mktemp("one") / "run"
  run_job(distributed_config(model_dir, text, run_dir), 1)
  return results(run_dir)


@pytest.mark.parametrize("num_processes", [2, 4])
def test_same_results_as_one_process(num_processes, job_assets, one_process, tmp_path):
  model_dir, _, text = job_assets
  run_dir = tmp_path / "run"
  outputs = run_job(distributed_config(model_dir, text, run_dir), num_processes)
  assert_same(results(run_dir), one_process, f"{num_processes} processes")
  # Process 0 reports; the others stay quiet.
  assert "run directory:" in outputs[0]
  assert all("run directory:" not in out for out in outputs[1:])
  # One writer: no stray temporary files of other processes.
  leftovers = [n for n in os.listdir(run_dir) if n.startswith(".tmp")]
  assert not leftovers, leftovers


def test_killed_process_resumes_to_the_same_ordering(job_assets, one_process, tmp_path):
  model_dir, _, text = job_assets
  run_dir = tmp_path / "run"
  config = distributed_config(model_dir, text, run_dir)
  config.eval.enabled = False  # compared above
  # Process 1 of 2 dies after recording step 2; the survivor then hangs in a collective (as on a
  # real cluster, where the scheduler tears the job down): kill it too.
  procs = start(config, 2, kill=(1, 2))
  victim = procs[1]
  try:
    victim.wait(timeout=TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    finish(procs)
  assert victim.returncode == -signal.SIGKILL
  state = json.loads((run_dir / "search_state.json").read_text())
  assert 1 <= len(state["steps"]) < 6, "the kill did not interrupt the search"
  assert not (run_dir / "ranking.json").exists()
  run_job(config, 2)
  assert_same(results(run_dir), one_process, "resumed after a kill")


def test_processes_with_different_inputs_stop_before_writing(job_assets, tmp_path):
  model_dir, _, text = job_assets
  other = tmp_path / "other.txt"
  other.write_text(open(text).read().replace("w1", "w2"))
  run_dir = tmp_path / "run"
  config = distributed_config(model_dir, text, run_dir)
  codes, outputs = finish(start(config, 2, per_process={1: {"data.source": str(other)}}))
  assert codes == [2, 2], outputs
  for out in outputs:
    assert "error: processes [1] hold different calibration tokens than process 0" in out, out
    assert "Traceback" not in out
  assert not run_dir.exists()


def test_incomplete_distributed_settings_are_refused(monkeypatch):
  from finercut_jax.parallel import distributed
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(key, raising=False)
  with pytest.raises(distributed.DistributedError, match="process_id unset"):
    distributed.initialize(distributed.Settings("localhost:1234", 2, None))
  with pytest.raises(distributed.DistributedError, match=r"process_id=2 is not in \[0, num"):
    distributed.initialize(distributed.Settings("localhost:1234", 2, 2))
  # The environment fills what the config leaves unset; the config wins where both are set.
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:99")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.Settings.from_config({"process_id": 1}) == distributed.Settings("host:99", 4, 1)
  # An explicit single process starts nothing.
  distributed.initialize(distributed.Settings(None, 1, None))
  assert not distributed.jax.distributed.is_initialized()


def test_mesh_that_does_not_fit_the_devices_fails_first(job_assets, tmp_path):
  from finercut_jax import jobs
  model_dir, _, text = job_assets
  config = job_config(model_dir, text, tmp_path / "run")
  config.scorer.mesh_cand = 0
  config.scorer.mesh_model = 3  # the test session has 8 devices
  with pytest.raises(ValueError, match=r"model axis 3 \(scorer.mesh_model\) does not divide the 8 "
                                       r"devices of this job \(1 process"):
    jobs.run_pruning(config)
  assert not (tmp_path / "run").exists()


def test_a_refusal_on_process_0_stops_every_process(job_assets, tmp_path):
  """Only process 0 takes the run directory's lock: its refusal must reach the others, which
  would otherwise wait for it at the next collective forever."""
  model_dir, _, text = job_assets
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  with RunDir(str(run_dir)).lock():
    codes, outputs = finish(start(distributed_config(model_dir, text, run_dir), 2), timeout=300)
  assert codes == [2, 2], outputs
  for out in outputs:
    assert "is in use by another job" in out and "Traceback" not in out, out
