"""The job's outputs: pruned checkpoints, the main job end to end, bad input, calibration data.

Logit tolerance 1e-5 (relative and absolute): a pruned checkpoint runs the same float32 weights
through the same sublayer functions as the dense model with the mask, only scheduled differently
(a scan over kept sublayers vs a scan over blocks that skips removed ones), so the two agree to
float32 rounding (measured <= 7.2e-7 on logits of magnitude ~4); a wrong, missing or reordered
sublayer changes logits by O(1).
"""
import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import finercut_jax
import finercut_ref as R
from finercut_jax import data, jobs
from finercut_jax import search as search_module
from finercut_jax.jobs.settings import base_config
from finercut_jax.model import checkpoint
from finercut_jax.model.modules import param_shapes, sublayer_param_names
from finercut_jax.rundir import RunDir
from hf_tiny import WORDS, make_hf_model, make_tokenizer, save_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = R.TINY.num_layers


def assert_logits_close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert np.abs(want).max() > 1.0, "logits too small for the tolerance to mean anything"
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def stored_params(directory):
  """The raw Orbax tree of a pruned checkpoint, as written."""
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), "params"))


def sublayer_sizes(cfg):
  shapes = param_shapes(cfg)["layers"]
  size = lambda names: sum(int(np.prod(shapes[n][1:])) for n in names)
  return tuple(size(names) for names in sublayer_param_names(cfg))


# ----------------------------------------------------------------------------- pruned checkpoints

MASKS = {
    "some removed": R.without(np.ones((L, 2), bool), [1, 4, 9, 10]),
    "all attention removed": R.without(np.ones((L, 2), bool), range(0, 2 * L, 2)),
    "all FFN removed": R.without(np.ones((L, 2), bool), range(1, 2 * L, 2)),
    "everything removed": np.zeros((L, 2), bool),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_pruned_checkpoint_round_trip(name, tmp_path):
  cfg, params, tokens = R.tiny_model()
  keep = MASKS[name]
  directory = checkpoint.save_pruned(str(tmp_path / "ckpt"), cfg, params, keep, source="tiny")
  model, tokenizer = checkpoint.restore_pruned(directory)
  assert tokenizer is None
  want = R._forward(params, cfg, jnp.asarray(tokens), jnp.asarray(keep))
  assert_logits_close(model(jnp.asarray(tokens)), want)

  # The removed sublayers' weights are not in the checkpoint at all.
  stored = stored_params(directory)
  assert "layers" not in stored
  for group, names, kept in zip(("attn", "ffn"), sublayer_param_names(cfg), keep.sum(axis=0)):
    if kept == 0:
      assert group not in stored
    else:
      assert sorted(stored[group]) == sorted(names)
      assert all(v.shape[0] == kept for v in stored[group].values())
  attn_size, ffn_size = sublayer_sizes(cfg)
  dense_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  want_size = dense_size - attn_size * (~keep[:, 0]).sum() - ffn_size * (~keep[:, 1]).sum()
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(stored)) == want_size
  assert model.num_params() == want_size


def test_load_pruned_from_run_dir(tmp_path):
  cfg, params, tokens = R.tiny_model()
  keep = MASKS["some removed"]
  run_dir = str(tmp_path / "run")
  checkpoint.save_pruned(RunDir(run_dir).checkpoint_dir(0.25), cfg, params, keep)
  assert os.path.isdir(os.path.join(run_dir, "pruned", "ratio_0.25", "params"))
  model, _ = checkpoint.load_pruned(run_dir, 0.25)
  want = R._forward(params, cfg, jnp.asarray(tokens), jnp.asarray(keep))
  assert_logits_close(model(jnp.asarray(tokens)), want)
  with pytest.raises(FileNotFoundError, match="ratio_0.25"):  # says what is available
    checkpoint.load_pruned(run_dir, 0.5)


# ----------------------------------------------------------------------------- the main job

def text_lines(count=40, seed=0):
  """Lines of random words, with empty lines among them."""
  rng = np.random.default_rng(seed)
  return ["" if i % 7 == 3 else " ".join(rng.choice(WORDS, 8)) for i in range(count)]


@pytest.fixture(scope="module")
def job_assets(tmp_path_factory):
  """A tiny Hugging Face checkpoint dir with a tokenizer, and a .txt calibration file."""
  root = tmp_path_factory.mktemp("job")
  # 3 blocks, vocab 97 >= the tokenizer's 61; initializer_range 0.3 so that the greedy steps
  # have clear winners (asserted against the reference below).
  model_dir = save_hf_model(make_hf_model("gqa_tied", seed=3, num_layers=3, initializer_range=0.3),
                            root / "model")
  tokenizer = make_tokenizer(model_dir)
  text = root / "calibration.txt"
  text.write_text("\n".join(text_lines()) + "\n")
  return model_dir, tokenizer, str(text)


def job_config(model_dir, text, run_dir, **search):
  c = base_config()
  c.run_dir = str(run_dir)
  c.model.path = model_dir
  c.data.source = text
  c.data.num_sequences = 2
  c.data.seq_len = 16
  c.search.metric = "js"
  c.search.ratio = 0.5
  c.search.mask_ratios = (0.25, 0.5)
  c.search.full_ordering = True
  c.scorer.position_block = 8
  # One device: compiling for the 8-device mesh costs seconds more, and meshes are tested
  # (in a subprocess) by test_scorer.py.
  c.scorer.mesh_cand = 1
  c.compilation_cache = ""  # process-wide: tested in a subprocess by test_scorer.py
  for k, v in search.items():
    setattr(c.search, k, v)
  return c


class Interrupt(Exception):
  pass


@contextlib.contextmanager
def interrupted_search(at_step: int):
  """`jobs.run_pruning` in the block stops with Interrupt once greedy step `at_step` is recorded."""
  original = search_module.greedy_search

  def interrupted(*args, on_step=None, **kwargs):
    def stop(record):
      on_step(record)
      if record.step == at_step:
        raise Interrupt
    return original(*args, on_step=stop, **kwargs)

  search_module.greedy_search = interrupted
  try:
    with pytest.raises(Interrupt):
      yield
  finally:
    search_module.greedy_search = original


def test_main_job_end_to_end(job_assets, tmp_path):
  model_dir, tokenizer, text = job_assets
  run_dir = tmp_path / "run"
  config = job_config(model_dir, text, run_dir)

  # First run: interrupted after 2 of the 6 steps.
  with interrupted_search(at_step=1):
    jobs.run_pruning(config)
  partial = json.loads((run_dir / "search_state.json").read_text())["steps"]
  assert len(partial) == 2
  assert not (run_dir / "ranking.json").exists()

  # Second run: resumes and finishes.
  assert jobs.run_pruning(config).path == str(run_dir)
  for name in ("config.json", "calibration_tokens.npy", "ranking.json", "masks.json",
               "search_state.json"):
    assert (run_dir / name).is_file(), name
  resolved = json.loads((run_dir / "config.json").read_text())
  assert resolved["model"]["path"] == model_dir and resolved["search"]["metric"] == "js"

  tokens = np.load(run_dir / "calibration_tokens.npy")
  joined = " ".join(line for line in text_lines() if line)
  np.testing.assert_array_equal(tokens.reshape(-1), tokenizer(joined)["input_ids"][:32])
  assert tokens.shape == (2, 16)

  ranking = json.loads((run_dir / "ranking.json").read_text())
  steps = ranking["steps"]
  assert len(steps) == 6  # full ordering of 2L sublayers
  for t, r in enumerate(steps):
    assert r["step"] == t and r["kind"] in ("attn", "ffn") and r["block"] in range(3)
    assert isinstance(r["score"], float) and r["seconds"] >= 0
  assert steps[:2] == [{k: v for k, v in r.items() if k != "scores"} for r in partial], (
      "the resumed steps were recomputed, not read from the state")

  # The same ordering and scores as the plain reference on the loaded model and saved tokens.
  model, _ = finercut_jax.load_model(model_dir, tokenizer=False)
  cfg, params = model.config, model.params()
  reference = R.reference_greedy("js", params, cfg, tokens)
  assert reference[2].min() > 5e-4, "reference near a tie"
  R.check_search(steps, reference, 1e-5, "main job")

  # Masks: nested prefixes of the ordering, int(ratio * 2L) removals each.
  masks = json.loads((run_dir / "masks.json").read_text())
  assert sorted(masks) == ["0.25", "0.5"]
  for ratio, count in (("0.25", 1), ("0.5", 3)):
    want = search_module.keep_mask(3, [r["sublayers"] for r in steps[:count]])
    np.testing.assert_array_equal(np.asarray(masks[ratio], bool), want)

  # Pruned checkpoints: the masked dense model's logits, and the tokenizer.
  for ratio in (0.25, 0.5):
    assert (run_dir / "pruned" / f"ratio_{ratio:g}").is_dir()
  pruned, pruned_tokenizer = checkpoint.load_pruned(str(run_dir), 0.5)
  keep = np.asarray(masks["0.5"], bool)
  want = R._forward(params, cfg, jnp.asarray(tokens), jnp.asarray(keep))
  assert_logits_close(pruned(jnp.asarray(tokens)), want)
  assert pruned_tokenizer("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]

  # (A rerun of a finished search does no scoring: test_search.py::test_resume_after_interrupt.)


def bad_configs(model_dir, text, run_dir):
  """(what, config, words the message must contain), each refused before anything is written."""
  configs = []

  def add(what, words, **changes):
    c = job_config(model_dir, text, run_dir)
    for key, value in changes.items():
      section, field = key.split("__")
      setattr(getattr(c, section), field, value)
    configs.append((what, c, words))

  add("unknown metric", ["metric", "bogus"], search__metric="bogus")
  add("ratio 0", ["ratio", "0"], search__ratio=0.0)
  add("ratio 1.5", ["ratio", "1.5"], search__ratio=1.5)
  add("N*T beyond the text", ["tokens", "50*64"], data__num_sequences=50, data__seq_len=64)
  add("missing checkpoint dir", ["no such checkpoint directory"],
      model__path=os.path.join(os.path.dirname(model_dir), "missing_model"))
  return configs


def test_bad_input_is_refused_before_writing(job_assets, tmp_path):
  model_dir, _, text = job_assets
  run_dir = tmp_path / "run"
  for what, config, words in bad_configs(model_dir, text, run_dir):
    with pytest.raises((ValueError, FileNotFoundError)) as e:  # what main prints as one line
      jobs.run_pruning(config)
    message = str(e.value)
    assert "\n" not in message, (what, message)
    for word in words:
      assert word in message, (what, message)
    assert not run_dir.exists(), f"{what}: wrote {list(run_dir.iterdir())}"


def test_cli_bad_input_is_one_line(tmp_path):
  run_dir = tmp_path / "cli_run"
  missing = tmp_path / "no_model_here"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, "-m", "finercut_jax.main", "--config=configs/smollm2_135m.py",
       f"--config.run_dir={run_dir}", f"--config.model.path={missing}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert str(missing) in lines[0]
  assert not run_dir.exists()


# ----------------------------------------------------------------------------- calibration data


def write_sources(directory, lines):
  import pyarrow as pa
  import pyarrow.parquet as pq
  paths = {ext: os.path.join(directory, f"text.{ext}") for ext in ("txt", "jsonl", "parquet")}
  with open(paths["txt"], "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(paths["jsonl"], "w") as f:
    for i, line in enumerate(lines):
      f.write(json.dumps({"text": line, "id": i}) + "\n")
      if i == 1:
        f.write("\n")  # a blank line in the file is not a record
  pq.write_table(pa.table({"text": lines + [None], "id": list(range(len(lines) + 1))}),
                 paths["parquet"])
  return paths


def test_text_file_readers(tmp_path):
  lines = ["first line", "", "  second line, indented ", "", "third"]
  paths = write_sources(tmp_path, lines)
  # Non-empty lines joined with one space, not stripped (the official WikiText recipe).
  want = "first line   second line, indented  third"
  for ext, path in paths.items():
    assert data.source_text(path) == want, ext

  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "text.csv").write_text("text\na\n")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["a"]}), str(tmp_path / "bad.parquet"))
  for name, words in (("bad.jsonl", ["bad.jsonl:2", "text"]), ("empty.txt", ["no text"]),
                      ("text.csv", ["unsupported"]), ("bad.parquet", ["'text' column"]),
                      ("missing.txt", ["no such"])):
    with pytest.raises(data.DataError) as e:
      data.source_text(str(tmp_path / name))
    assert all(w in str(e.value) for w in words), (name, str(e.value))


def test_calibration_chunks_are_contiguous(tmp_path):
  tokenizer = make_tokenizer(tmp_path / "tok")
  lines = text_lines(30, seed=1)
  paths = write_sources(tmp_path, lines)
  stream = tokenizer(" ".join(line for line in lines if line))["input_ids"]
  assert len(stream) > 150
  for path in paths.values():
    tokens = data.calibration_tokens(tokenizer, path, 3, 50)
    assert tokens.shape == (3, 50) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens.reshape(-1), stream[:150])
  with pytest.raises(data.DataError, match=f"{len(stream)} tokens"):
    data.calibration_tokens(tokenizer, paths["txt"], 10, 50)


def test_packaged_source_is_long_enough():
  from finercut_jax.model.loading import load_tokenizer
  passages = data.packaged_passages()
  assert len(passages) == len(set(passages)) > 500
  tokenizer = load_tokenizer("smollm2-135m")
  stream = data.token_stream(tokenizer, data.PACKAGED)
  assert len(stream) > 100_000, len(stream)
  tokens = data.calibration_tokens(tokenizer, data.PACKAGED, 10, 256)  # the paper's N x T
  np.testing.assert_array_equal(tokens.reshape(-1), stream[:2560])
