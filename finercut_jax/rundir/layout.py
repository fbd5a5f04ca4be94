"""Where every file of a run lives, and how each is read and written: the one place that spells
the run directory's file names.

A run directory (`RunDir`) holds
  config.json              the job's resolved config (written first)
  calibration_tokens.npy   the calibration tokens `[N, T]` the search scored on
  search_state.json        the greedy search's fingerprint and steps (resumes an interrupted run)
  ranking.json             the removal order (`records.Ranking`)
  masks.json               keep masks `[L, 2]` per ratio; with ranking.json, marks the results done
  pruned/ratio_<r>/        the pruned model of each ratio (an Orbax checkpoint, `model.checkpoint`)
  healed/ratio_<r>/        a healed model: its checkpoint, train/ (the training state),
                           healing.json (settings and loss curve), healing.png
  eval_results.json        evaluation of the dense, pruned and healed models
  layer_map.png, score_per_step.png, metrics_vs_ratio.png, report.md
  .lock                    held by the one job that writes the directory

A comparison directory (`ComparisonDir`) holds one run directory per method, and
  comparison_state.json, calibration_tokens.npy, dense_eval.json, comparison.json,
  comparison.md, accuracy_vs_ratio.png, perplexity_vs_ratio.png, layer_maps.png

Nothing here knows about processes: callers of a multi-process job read and write through
`parallel.distributed.on_primary`.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from finercut_jax.rundir import atomic
from finercut_jax.rundir.records import Ranking, RecordError

# The run's pictures, by what they show.
RUN_PLOTS = {"layer_map": "layer_map.png", "scores": "score_per_step.png",
             "metrics_vs_ratio": "metrics_vs_ratio.png"}
# A healed model's settings and loss curve, relative to the run directory (as a report names it).
HEALING_RECORD = os.path.join("healed", "ratio_<r>", "healing.json")
COMPARISON_PLOTS = {"average": "accuracy_vs_ratio.png", "perplexity": "perplexity_vs_ratio.png",
                    "layer_maps": "layer_maps.png"}


def ratio_name(ratio: float) -> str:
  """`ratio_0.25`: a ratio's checkpoint directory name (`%g` of the ratio)."""
  return f"ratio_{float(ratio):g}"


def ratio_key(ratio: float) -> str:
  """`0.25`: a ratio as masks.json and eval_results.json key it."""
  return f"{float(ratio):g}"


class _File:
  """A file of a directory, read as an attribute: `run.config_file` is the path of config.json."""

  def __init__(self, name: str):
    self.name = name

  def __get__(self, directory, owner=None):
    return self if directory is None else directory.file(self.name)


class _Directory:
  """What a run directory and a comparison directory share: the path, the lock, the tokens."""

  lock_file = _File(".lock")
  tokens_file = _File("calibration_tokens.npy")

  def __init__(self, path: str):
    self.path = os.fspath(path)

  def __fspath__(self) -> str:
    return self.path

  def __str__(self) -> str:
    return self.path

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r})"

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def exists(self) -> bool:
    return os.path.isdir(self.path)

  def lock(self) -> contextlib.AbstractContextManager:
    """Holds the directory's lock while the block runs: one job writes a directory at a time
    (the operating system releases it when the process ends, however it ends)."""
    return atomic.exclusive_lock(self.lock_file, self.path)

  def read_tokens(self, *, missing_ok: bool = True) -> np.ndarray | None:
    """The calibration tokens `int32 [N, T]`; None before they are written (`missing_ok`),
    else FileNotFoundError."""
    if missing_ok and not os.path.isfile(self.tokens_file):
      return None
    return np.load(self.tokens_file)

  def write_tokens(self, tokens: np.ndarray) -> None:
    atomic.atomic_save_npy(self.tokens_file, tokens)


class RunDir(_Directory):
  """One run: the files a search writes, and what evaluation, healing and export add."""

  # --------------------------------------------------------------------------- paths

  config_file = _File("config.json")
  state_file = _File("search_state.json")
  ranking_file = _File("ranking.json")
  masks_file = _File("masks.json")
  eval_results_file = _File("eval_results.json")
  report_file = _File("report.md")

  def plot_file(self, what: str) -> str:
    """The picture `what` (a key of `RUN_PLOTS`)."""
    return self.file(RUN_PLOTS[what])

  def checkpoint_group(self, *, healed: bool = False) -> str:
    return self.file("healed" if healed else "pruned")

  def checkpoint_dir(self, ratio: float, *, healed: bool = False) -> str:
    """The pruned (or healed) model of `ratio`."""
    return os.path.join(self.checkpoint_group(healed=healed), ratio_name(ratio))

  def checkpoint_names(self, *, healed: bool = False) -> list[str]:
    """The checkpoint directories there are (`ratio_<r>`), sorted."""
    group = self.checkpoint_group(healed=healed)
    return sorted(os.listdir(group)) if os.path.isdir(group) else []

  def healing_record_file(self, ratio: float) -> str:
    return os.path.join(self.checkpoint_dir(ratio, healed=True),
                        os.path.basename(HEALING_RECORD))

  def healing_plot_file(self, ratio: float) -> str:
    return os.path.join(self.checkpoint_dir(ratio, healed=True), "healing.png")

  def healing_train_dir(self, ratio: float) -> str:
    """Orbax checkpoints of a healing run's training state."""
    return os.path.join(os.path.abspath(self.checkpoint_dir(ratio, healed=True)), "train")

  # --------------------------------------------------------------------------- reading

  def read_config(self, *, missing_ok: bool = False) -> dict:
    """The run's resolved config; an error if this is not a run directory (`missing_ok`: {})."""
    config = atomic.read_json(self.config_file)
    if config is None and missing_ok:
      return {}
    if config is None:
      raise FileNotFoundError(f"{self.config_file} is missing: not a run directory")
    if not isinstance(config, dict):
      raise RecordError(f"{self.config_file}: expected a JSON object, got "
                        f"{type(config).__name__}")
    return config

  def read_ranking(self) -> Ranking | None:
    data = atomic.read_json(self.ranking_file)
    return None if data is None else Ranking.from_json(data, self.ranking_file)

  def read_masks(self) -> dict[str, np.ndarray] | None:
    """`{ratio key: keep bool [L, 2]}`, or None before the search has finished."""
    data = atomic.read_json(self.masks_file)
    if data is None:
      return None
    if not isinstance(data, dict):
      raise RecordError(f"{self.masks_file}: expected a JSON object, got {type(data).__name__}")
    return {key: np.asarray(keep, bool) for key, keep in data.items()}

  def read_eval_results(self) -> dict:
    return atomic.read_json(self.eval_results_file, {})

  def holds_results(self, ratios, *, method: str, seed: int | None) -> bool:
    """The directory holds `method`'s (and `seed`'s) ranking and masks at every ratio."""
    masks = atomic.read_json(self.masks_file)
    config = atomic.read_json(self.config_file) or {}
    return (masks is not None and os.path.exists(self.ranking_file)
            and config.get("method") == method and config.get("seed") == seed
            and all(ratio_key(r) in masks for r in ratios))

  # --------------------------------------------------------------------------- writing

  def write_start(self, config: dict, tokens: np.ndarray) -> None:
    """The resolved config and the calibration tokens, as a run starts."""
    os.makedirs(self.path, exist_ok=True)
    atomic.atomic_write_json(self.config_file, config)
    self.write_tokens(tokens)

  def write_results(self, ranking: Ranking, masks: dict[str, np.ndarray]) -> None:
    """`ranking.json`, then `masks.json` (`{ratio key: keep [L, 2]}`): written last, after the
    checkpoints, they mark the results complete."""
    atomic.atomic_write_json(self.ranking_file, ranking.to_json())
    atomic.atomic_write_json(self.masks_file,
                             {r: np.asarray(k, bool).tolist() for r, k in masks.items()})

  def write_eval_results(self, results: dict) -> None:
    atomic.atomic_write_json(self.eval_results_file, results)

  def write_report(self, text: str) -> None:
    atomic.atomic_write_bytes(self.report_file, text.encode())


class ComparisonDir(_Directory):
  """Several methods on one model and one set of calibration tokens, one run directory each."""

  state_file = _File("comparison_state.json")
  dense_eval_file = _File("dense_eval.json")
  json_file = _File("comparison.json")
  markdown_file = _File("comparison.md")

  @classmethod
  def beside(cls, run_dir: str) -> "ComparisonDir":
    """The default comparison directory of a job whose run_dir is `run_dir`."""
    return cls(f"{os.fspath(run_dir).rstrip('/')}_comparison")

  def plot_file(self, what: str) -> str:
    """The picture `what` (a key of `COMPARISON_PLOTS`)."""
    return self.file(COMPARISON_PLOTS[what])

  def method(self, name: str, seed: int | None = None, first_seed: int | None = None) -> RunDir:
    """The run directory of `name`; a random method's first seed in it, each other seed in
    `<name>/seed_<s>/`."""
    base = self.file(name)
    return RunDir(base if seed is None or seed == first_seed else
                  os.path.join(base, f"seed_{seed}"))

  def read_fingerprint(self) -> dict | None:
    state = atomic.read_json(self.state_file)
    return None if state is None else state.get("fingerprint", {})

  def write_start(self, fingerprint: dict, tokens: np.ndarray) -> None:
    os.makedirs(self.path, exist_ok=True)
    self.write_tokens(tokens)
    atomic.atomic_write_json(self.state_file, {"fingerprint": fingerprint})

  def read_dense_eval(self) -> dict | None:
    return atomic.read_json(self.dense_eval_file)

  def write_dense_eval(self, entry: dict) -> None:
    atomic.atomic_write_json(self.dense_eval_file, entry)

  def read_method_masks(self, names) -> dict[str, dict]:
    """Each method's masks.json as stored (`{ratio key: [[bool, bool], ...]}`)."""
    return {name: atomic.read_json(self.method(name).masks_file) for name in names}

  def write_report(self, result: dict, markdown: str) -> None:
    atomic.atomic_write_json(self.json_file, result)
    atomic.atomic_write_bytes(self.markdown_file, markdown.encode())
