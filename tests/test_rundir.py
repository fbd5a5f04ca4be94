"""The run directory as a contract: its typed records read what the product wrote before they
existed, and write it back the same; a run written before the package was restructured (commit
638644f, `tests/data/before_redesign`) reads, restores and resumes unchanged."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from finercut_jax import jobs, load_model, load_pruned
from finercut_jax.rundir import Ranking, RecordError, RemovalStep, RunDir
from finercut_jax.scoring import Scorer
from test_main import job_config

# A run written by commit 638644f, with the tiny model and calibration text it was written from:
# the model's files are kept as written (their fingerprint includes the writing transformers
# version, in config.json), so the run resumes whatever transformers reads them.
LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "before_redesign")
# Where the model, the calibration text and the run lay when the run was written; the copy's
# files are rewritten to the test's own directory, as if the user had kept them in place.
LEGACY_ROOT = "/tmp/legacy"


def _legacy_run(root) -> tuple[str, str, str]:
  """The legacy run, its model and its calibration text, copied under `root`."""
  shutil.copytree(LEGACY, root, dirs_exist_ok=True)
  for directory, _, files in os.walk(root / "run"):
    for name in files:
      if name.endswith(".json"):
        path = os.path.join(directory, name)
        with open(path) as f:
          content = f.read()
        with open(path, "w") as f:
          f.write(content.replace(LEGACY_ROOT, str(root)))
  return str(root / "model"), str(root / "calibration.txt"), str(root / "run")


def test_records_round_trip_the_legacy_files():
  run = RunDir(os.path.join(LEGACY, "run"))
  with open(run.ranking_file) as f:
    stored = json.load(f)
  ranking = run.read_ranking()
  assert isinstance(ranking, Ranking) and ranking.to_json() == stored
  assert [s.name for s in ranking.steps] == [f"{s['kind']}{s['block']}" for s in stored["steps"]]
  with open(run.state_file) as f:
    state = json.load(f)
  steps = [RemovalStep.from_json(s) for s in state["steps"]]
  assert [s.to_json() for s in steps] == state["steps"]  # the scores included
  with open(run.masks_file) as f:
    masks = json.load(f)
  assert {k: v.tolist() for k, v in run.read_masks().items()} == masks
  assert run.read_config()["search"]["ratio"] == 0.5
  assert run.checkpoint_names() == ["ratio_0.25", "ratio_0.5"]


def test_damaged_records_are_refused_by_name(tmp_path):
  with pytest.raises(RecordError, match="missing kind, score"):
    RemovalStep.from_json({"step": 0, "sublayers": [1], "block": 0})
  with pytest.raises(RecordError, match="expected a JSON object, got list"):
    Ranking.from_json([])
  run = RunDir(tmp_path)
  with open(run.masks_file, "w") as f:
    f.write("[]")
  with pytest.raises(RecordError, match=r"masks\.json: expected a JSON object"):
    run.read_masks()
  with pytest.raises(FileNotFoundError, match=r"config\.json is missing: not a run directory"):
    run.read_config()


def test_a_run_written_before_the_redesign_restores_and_resumes(tmp_path, monkeypatch):
  model_dir, text, run_path = _legacy_run(tmp_path)
  run = RunDir(run_path)
  files = (run.ranking_file, run.masks_file, run.state_file)
  before = {}
  for path in files:
    with open(path) as f:
      before[path] = json.load(f)

  # Its pruned checkpoints restore as the dense model pruned by the stored mask.
  dense, _ = load_model(model_dir, tokenizer=False)
  tokens = run.read_tokens()
  for ratio, keep in run.read_masks().items():
    pruned, tokenizer = load_pruned(run_path, float(ratio))
    assert tokenizer is not None and np.array_equal(pruned.present, keep)
    np.testing.assert_allclose(np.asarray(pruned(tokens)), np.asarray(dense(tokens, keep)),
                               rtol=1e-6, atol=1e-6)

  # The same job on it resumes every step from the state file (nothing is scored again) and
  # writes the same ranking, masks and state.
  def no_scoring(*args, **kwargs):
    raise AssertionError("a finished search scored again")
  monkeypatch.setattr(Scorer, "score_step", no_scoring)
  assert jobs.run_pruning(job_config(model_dir, text, run_path)).path == run_path
  for path in files:
    with open(path) as f:
      assert json.load(f) == before[path], path
