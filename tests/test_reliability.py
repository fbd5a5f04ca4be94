"""Bad input, faults and concurrent runs: each gets one clear error with nothing written (or
nothing lost), and an interrupted job, rerun, ends exactly as an uninterrupted one.

Every test here failed before the reliability fixes (the numbered defects of the issue in the
comments): NaN weights scored 0.0 everywhere, a refused rerun rewrote config.json, evaluation
settings deleted earlier results, interrupted checkpoint saves left half-written directories, two
jobs mixed their results, swapped weights resumed, and many files failed with tracebacks.
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
from safetensors.numpy import load_file, save_file

import finercut_ref as R
from finercut_jax import jobs
from finercut_jax import search as search_module
from finercut_jax.evaluation.run import default_eval_config, evaluate_run
from finercut_jax.model import checkpoint
from finercut_jax.model.modules import Llama
from finercut_jax.rundir import RunDir
from finercut_jax.scoring import divergence
from finercut_jax.scoring.scorer import NonFiniteError, Scorer
from hf_tiny import make_hf_model, make_tokenizer, save_hf_model
from test_distributed import finish, start
from test_main import REPO, interrupted_search, job_assets, job_config  # noqa: F401 F811

ERRORS = (ValueError, OSError)  # what the CLIs print as one line with exit code 2


def copy_model(model_dir, dest):
  shutil.copytree(model_dir, dest)
  return str(dest)


def edit_tensor(model_dir, name, fn):
  path = os.path.join(model_dir, "model.safetensors")
  tensors = load_file(path)
  tensors[name] = fn(tensors[name].copy())
  save_file(tensors, path, metadata={"format": "pt"})


def refused(config, *words):
  """jobs.run_pruning(config) fails with one line holding `words`, and the run directory is
  untouched."""
  run_dir = config.run_dir
  before = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else None
  # (`.lock` records who holds the directory: a refused job may have held it, briefly.)
  contents = {n: open(os.path.join(run_dir, n), "rb").read() for n in before or []
              if os.path.isfile(os.path.join(run_dir, n)) and n != ".lock"}
  with pytest.raises(ERRORS) as e:
    jobs.run_pruning(config)
  message = str(e.value)
  assert "\n" not in message, message
  for word in words:
    assert word in message, message
  if before is None:
    assert not os.path.exists(run_dir), os.listdir(run_dir)
  else:
    assert sorted(os.listdir(run_dir)) == before
    for n, data in contents.items():
      assert open(os.path.join(run_dir, n), "rb").read() == data, f"{n} was rewritten"
  return message


# ----------------------------------------------------------------------------- 1. NaN / inf


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weights_stop_every_metric_before_writing(bad, job_assets, tmp_path):
  model_dir, _, text = job_assets
  broken = copy_model(model_dir, tmp_path / "model")

  def poison(w):
    w[3, 5] = bad
    return w
  edit_tensor(broken, "model.layers.1.mlp.down_proj.weight", poison)
  for metric in divergence.METRICS:
    config = job_config(broken, text, tmp_path / f"run_{metric}", metric=metric)
    refused(config, "weights hold NaN/inf", "w_down of block 1")


def test_nonfinite_outputs_are_errors_not_scores():
  """Finite weights whose outputs are not (an overflow): the dense reference, and a candidate's
  score, are refused by name; never masked into 0."""
  cfg, params, tokens = R.tiny_model()
  huge = jax.tree.map(lambda x: x, params)
  for name in ("w_up", "w_down"):  # block 1's FFN output overflows float32 (1e60)
    huge["layers"][name] = params["layers"][name].at[1].multiply(1e30)
  keep = np.ones((cfg.num_layers, 2), bool)
  pool = search_module.SearchSpec(cfg.num_layers).pool_candidates()
  for metric in divergence.METRICS:
    if metric == "ppl":  # no dense reference to check: every candidate's score is refused
      scorer = Scorer(Llama.from_params(cfg, huge), tokens, metric=metric, position_block=R.POSITION_BLOCK)
      with pytest.raises(NonFiniteError, match="removing attn0, ffn0, .* gives non-finite"):
        scorer.score_step(keep, pool)
      continue
    with pytest.raises(NonFiniteError, match="dense model's outputs are NaN/inf at 16 of 16"):
      Scorer(Llama.from_params(cfg, huge), tokens, metric=metric, position_block=R.POSITION_BLOCK)
  # Candidates whose outputs overflow while the dense reference is finite: named, and the one
  # that removes the overflowing FFN is not among them.
  scorer = Scorer(Llama.from_params(cfg, params), tokens, metric="js", position_block=R.POSITION_BLOCK)
  scorer.params = nnx.state(Llama.from_params(cfg, huge))  # swapped in after the dense check
  with pytest.raises(NonFiniteError, match="gives non-finite") as e:
    scorer.score_step(keep, pool)
  assert "ffn1" not in str(e.value) and "attn0" in str(e.value)


@pytest.mark.parametrize("metric", divergence.METRICS)
def test_nan_logits_give_nan_terms(metric):
  """The root cause: the divergence kept a term only `where(m > 0)`, turning NaN into 0."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 11)), jnp.float32)
  ref = divergence.reference(metric, logits + 0.5)
  bad = logits.at[1, 4].set(jnp.nan)
  terms = divergence.position_terms(metric, ref, bad, jnp.asarray([1, 2, 3]))
  assert np.isnan(np.asarray(terms)[1]) and np.isfinite(np.asarray(terms)[[0, 2]]).all()


# ----------------------------------------------------------------------------- 2, 3, 6, 7


@pytest.fixture
def finished_run(job_assets, tmp_path):
  model_dir, _, text = job_assets
  config = job_config(model_dir, text, tmp_path / "run")
  jobs.run_pruning(config)
  return config


def test_refused_rerun_rewrites_nothing(finished_run):
  other = finished_run.copy_and_resolve_references()
  other.search.metric = "kl"
  message = refused(other, "holds a different search", "metric")
  assert "dtype" not in message.split("(")[1].split(")")[0]  # it names what differs


def test_tokenizer_larger_than_the_vocabulary(tmp_path, job_assets):
  _, _, text = job_assets
  small = save_hf_model(make_hf_model("gqa_tied", vocab_size=40, num_layers=2), tmp_path / "m")
  make_tokenizer(small)  # 61 tokens
  refused(job_config(small, text, tmp_path / "run"), "tokenizer has 61 tokens",
          "vocabulary is 40")


def test_one_job_per_run_directory(finished_run):
  with RunDir(finished_run.run_dir).lock():
    refused(finished_run, "is in use by another job", f"pid {os.getpid()}")
  jobs.run_pruning(finished_run)  # released: the same job runs again (nothing to score)


def test_swapped_weights_do_not_resume(job_assets, tmp_path):
  model_dir, _, text = job_assets
  model = copy_model(model_dir, tmp_path / "model")
  config = job_config(model, text, tmp_path / "run")
  with interrupted_search(at_step=1):
    jobs.run_pruning(config)
  edit_tensor(model, "model.layers.0.self_attn.q_proj.weight", lambda w: w * 1.01)
  refused(config, "holds a different search", "weights")


# ----------------------------------------------------------------------------- 4. evaluation


def small_eval(tasks, **changes):
  c = default_eval_config()
  c.tasks = tasks
  c.limit = 2
  c.perplexity.enabled = False
  c.throughput.enabled = False
  c.plots = False
  for k, v in changes.items():
    setattr(c, k, v)
  return c.to_dict()


def test_evaluation_settings_never_delete_results(finished_run):
  run_dir = finished_run.run_dir
  path = os.path.join(run_dir, "eval_results.json")
  first = evaluate_run(run_dir, small_eval("piqa"), log=lambda *_: None)
  second = evaluate_run(run_dir, small_eval("arc_easy"), log=lambda *_: None)
  for key, entry in second["models"].items():
    assert set(entry["benchmarks"]) == {"piqa", "arc_easy"}, key
    assert entry["benchmarks"]["piqa"] == first["models"][key]["benchmarks"]["piqa"]
    assert entry["average_tasks"] == ["arc_easy"]
  saved = open(path).read()
  with pytest.raises(ValueError, match=r"eval.ratios 0.3 not in .*masks.json \(it has 0.25, 0.5\)"):
    evaluate_run(run_dir, small_eval("piqa", ratios="0.3"), log=lambda *_: None)
  assert open(path).read() == saved
  # Another limit for one task recomputes that task only, and keeps the other.
  third = evaluate_run(run_dir, small_eval("piqa", limit=3), log=lambda *_: None)
  for key, entry in third["models"].items():
    assert entry["benchmarks"]["piqa"]["num_docs"] == 3
    assert entry["benchmarks"]["arc_easy"] == second["models"][key]["benchmarks"]["arc_easy"]
  # A damaged results file is an error naming it, never silently replaced.
  with open(path, "w") as f:
    f.write('{"models": ')
  with pytest.raises(ValueError, match="eval_results.json: not valid JSON"):
    evaluate_run(run_dir, small_eval("piqa"), log=lambda *_: None)


def test_evaluation_without_a_finished_search(job_assets, tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.json").write_text(json.dumps({"model": {"path": job_assets[0]}}))
  with pytest.raises(FileNotFoundError, match="masks.json is missing: the search has not"):
    evaluate_run(str(run_dir), small_eval("piqa"), log=lambda *_: None)


def test_unchanged_checkpoint_is_not_rewritten(tmp_path):
  """A rerun skips checkpoints that exist with the same contents, also for configs whose JSON
  form differs from their Python form (Llama-3 RoPE scaling is a tuple, stored as a list)."""
  from finercut_jax.model.loading import load_model
  src = save_hf_model(make_hf_model("llama3_rope_headdim", num_layers=2), tmp_path / "src")
  model, _ = load_model(src, tokenizer=False)
  keep = np.array([[True, False], [True, True]])
  directory = str(tmp_path / "ckpt")
  checkpoint.save_pruned(directory, model.config, model.params(), keep, source=src)
  meta = os.path.join(directory, "model.json")
  before = os.stat(meta).st_mtime_ns
  checkpoint.save_pruned(directory, model.config, model.params(), keep, source=src)
  assert os.stat(meta).st_mtime_ns == before, "rewritten"
  checkpoint.save_pruned(directory, model.config, model.params(), ~keep, source=src)
  assert os.stat(meta).st_mtime_ns != before, "a changed checkpoint was not rewritten"
  np.testing.assert_array_equal(checkpoint.restore_pruned(directory)[0].present, ~keep)


# ----------------------------------------------------------------------------- 8. bad input


def bad_inputs(model_dir, text, tmp):
  """(what, config, words of the message): each refused before anything is written."""
  cases = []

  def model_variant(name, fn):
    path = copy_model(model_dir, tmp / name)
    fn(path)
    return path

  def truncate(path):
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)

  def edit_config(fn):
    def apply(path):
      with open(os.path.join(path, "config.json")) as f:
        text = f.read()
      with open(os.path.join(path, "config.json"), "w") as f:
        f.write(fn(text))
    return apply

  def case(what, words, model=model_dir, source=text, **changes):
    c = job_config(model, source, tmp / f"run_{len(cases)}")
    for key, value in changes.items():
      section, field = key.split("__")
      setattr(getattr(c, section) if section != "top" else c, field, value)
    cases.append((what, c, words))

  case("truncated safetensors", ["model.safetensors: not a readable safetensors file"],
       model=model_variant("truncated", truncate))
  case("config.json without num_attention_heads", ["num_attention_heads missing"],
       model=model_variant("no_heads", edit_config(
           lambda t: json.dumps({k: v for k, v in json.loads(t).items()
                                 if k != "num_attention_heads"}))))
  case("invalid JSON", ["config.json: not valid JSON"],
       model=model_variant("bad_json", edit_config(lambda t: t[:-10])))
  latin = tmp / "latin1.txt"
  latin.write_bytes(open(text, "rb").read() + "caf\xe9\n".encode("latin-1"))
  case("non-UTF-8 text", [f"{latin}: not UTF-8 text"], source=str(latin))
  case("unknown dtype", ["unknown model.dtype 'float13'"], model__dtype="float13")
  a_file = tmp / "a_file"
  a_file.write_text("x")
  case("run_dir is a file", ["is a file, not a directory"], top__run_dir=str(a_file / "run"))
  case("seq_len beyond the context", ["data.seq_len=200", "max_position_embeddings=128"],
       data__seq_len=200)
  return cases


def test_bad_inputs_are_one_line_errors_before_writing(job_assets, tmp_path):
  model_dir, _, text = job_assets
  for what, config, words in bad_inputs(model_dir, text, tmp_path):
    try:
      refused(config, *words)
    except AssertionError as e:
      raise AssertionError(f"{what}: {e}") from None


def test_truncated_gguf_is_a_clear_error(tmp_path):
  from finercut_jax.model import loading
  source = loading.resolve_default_model()
  broken = tmp_path / "truncated.gguf"
  with open(source, "rb") as f:
    broken.write_bytes(f.read(1 << 20))
  with pytest.raises(loading.CheckpointError, match="truncated.gguf: not a readable GGUF file"):
    loading.load_config(str(broken))


def cli(module, *args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [REPO, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module,args,words", [
    ("finercut_jax.main", ["--config=configs/smollm2_135m.py", "--config.bogus=1"],
     "unknown setting --config.bogus"),
    ("finercut_jax.main", ["--config=configs/smollm2_135m.py", "--config.search.ration=0.3"],
     'unknown setting --config.search.ration: Did you mean "ratio"'),
    ("finercut_jax.main", ["--config=configs/missing.py", "--config.run_dir=/tmp/x"],
     "No such file or directory"),
    ("finercut_jax.evaluate", ["--run_dir=/nonexistent/run"], "/nonexistent/run: no such run"),
    ("finercut_jax.evaluate", ["--run_dir=.", "--eval.bogus=1"], "unknown setting --eval.bogus"),
])
def test_cli_errors_are_one_line(module, args, words):
  proc = cli(module, *args)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr


def test_full_disk_is_one_line(monkeypatch, capsys):
  import errno

  from finercut_jax.jobs import cli as cli_module

  def full(*_):
    raise OSError(errno.ENOSPC, "No space left on device", "runs/x/search_state.json")
  with pytest.raises(SystemExit) as e, cli_module.expected_errors():
    full()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no space left on the device (runs/x/search_state.json)")
  with pytest.raises(KeyError), cli_module.expected_errors():  # a bug keeps its traceback
    raise KeyError("bug")


# ----------------------------------------------------------------------------- 5. kills


def kill_config(model_dir, text, run_dir, evaluation):
  c = job_config(model_dir, text, run_dir)
  c.eval.enabled = evaluation
  c.eval.tasks = "piqa"
  c.eval.limit = 2
  c.eval.perplexity.num_tokens = 64
  c.eval.throughput.enabled = False
  c.eval.plots = False
  return c


def outcome(run_dir):
  """The results of a finished run that an interruption must not change."""
  state = json.loads(open(os.path.join(run_dir, "search_state.json")).read())
  steps = [{k: r[k] for k in ("sublayer", "score", "scores")} for r in state["steps"]]
  tokens = np.load(os.path.join(run_dir, "calibration_tokens.npy"))
  masks = json.loads(open(os.path.join(run_dir, "masks.json")).read())
  logits = {r: np.asarray(checkpoint.load_pruned(run_dir, float(r))[0](jnp.asarray(tokens)))
            for r in masks}
  evaluation = None
  if os.path.exists(os.path.join(run_dir, "eval_results.json")):
    models = json.loads(open(os.path.join(run_dir, "eval_results.json")).read())["models"]
    evaluation = {k: (m["perplexity"]["nll"], {t: b["value"] for t, b in m["benchmarks"].items()})
                  for k, m in models.items()}
  return steps, masks, logits, evaluation


def leftovers(run_dir):
  found = []
  for root, dirs, files in os.walk(run_dir):
    found += [os.path.join(root, n) for n in dirs + files
              if n.startswith(".tmp") or "orbax-checkpoint-tmp" in n]
  return found


@pytest.fixture(scope="module")
def uninterrupted(job_assets, tmp_path_factory):
  model_dir, _, text = job_assets
  run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
  codes, out = finish(start(kill_config(model_dir, text, run_dir, True), 1))
  assert codes == [0], out
  return outcome(str(run_dir))


@pytest.mark.parametrize("point", ["mid_step", "before_save", "mid_save", "before_metadata",
                                   "mid_evaluation"])
def test_killed_job_reruns_to_the_same_results(point, job_assets, uninterrupted, tmp_path):
  model_dir, _, text = job_assets
  run_dir = tmp_path / "run"
  config = kill_config(model_dir, text, run_dir, True)
  codes, out = finish(start(config, 1, kill_at=(0, point)))
  assert codes == [-9], out
  if point in ("before_save", "mid_save", "before_metadata"):
    assert not os.path.exists(run_dir / "pruned" / "ratio_0.25" / "model.json")
    with pytest.raises(FileNotFoundError):  # an incomplete checkpoint never loads
      checkpoint.load_pruned(str(run_dir), 0.25)
  codes, out = finish(start(config, 1))
  assert codes == [0], out
  got = outcome(str(run_dir))
  want = uninterrupted
  assert [s["sublayer"] for s in got[0]] == [s["sublayer"] for s in want[0]]
  np.testing.assert_allclose([s["score"] for s in got[0]], [s["score"] for s in want[0]],
                             rtol=1e-6)
  assert got[1] == want[1]
  for r in want[2]:
    np.testing.assert_allclose(got[2][r], want[2][r], rtol=1e-6, atol=1e-6)
  assert got[3].keys() == want[3].keys()
  for k in want[3]:
    assert got[3][k][0] == pytest.approx(want[3][k][0], rel=1e-6) and got[3][k][1] == want[3][k][1]
  assert not leftovers(str(run_dir)), leftovers(str(run_dir))
