"""Pictures of a run: which sublayers went and when, the score per greedy step, and what the
pruned models still do as the ratio grows. PNG files through matplotlib's Agg backend.
"""
from __future__ import annotations

import os

import numpy as np

from finercut_jax.evaluation.harness_tasks import DISPLAY
from finercut_jax.rundir import Ranking, RunDir


def pyplot():
  """matplotlib's `pyplot` on the Agg backend (PNG files, no display)."""
  # lazy: matplotlib loads only when a picture is drawn, and its backend is chosen before pyplot
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  return plt


def removal_steps(ranking: dict, num_layers: int) -> np.ndarray:
  """`[L, 2]` greedy step (1-based, in ranking order) at which each sublayer was removed; 0 =
  never. A block-pool step removes both of a block's sublayers.

  Returns int32 [num_layers, 2].
  """
  steps = np.zeros((num_layers, 2), np.int32)
  for i, entry in enumerate(ranking.get("steps", [])):
    ids = entry.get("sublayers")
    if ids is None:
      ids = [entry["sublayer"]] if "sublayer" in entry else []
    for s in ids:
      steps[int(s) // 2, int(s) % 2] = i + 1
  return steps


def layer_map(ranking: dict, masks: dict, path: str, title: str = "") -> str:
  """Blocks on x, attention/FFN rows; per ratio, removed cells coloured by their greedy step.

  masks: {ratio: keep, bool [L, 2]}.
  """
  plt = pyplot()
  ratios = sorted(masks, key=float)
  L = int(ranking.get("num_layers") or len(masks[ratios[0]]))
  steps = removal_steps(ranking, L)
  max_step = max(int(steps.max()), 1)
  fig, axes = plt.subplots(len(ratios), 1, figsize=(max(6.0, 0.28 * L + 2), 1.25 * len(ratios) + 1),
                           squeeze=False)
  cmap = plt.get_cmap("viridis")
  image = None
  for ax, ratio in zip(axes[:, 0], ratios):
    keep = np.asarray(masks[ratio], bool)
    grid = np.where(~keep.T, np.maximum(steps.T, 1), np.nan).astype(float)
    ax.imshow(np.ones_like(grid), cmap="Greys", vmin=0, vmax=8, aspect="auto")  # kept: light grey
    image = ax.imshow(grid, cmap=cmap, vmin=1, vmax=max_step, aspect="auto")
    ax.set_yticks([0, 1], ["attn", "ffn"])
    ax.set_xticks(range(0, L, max(1, L // 15)))
    ax.set_xticks(np.arange(-0.5, L, 1), minor=True)
    ax.set_yticks([-0.5, 0.5, 1.5], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    removed = int((~keep).sum())
    ax.set_ylabel(f"ratio {float(ratio):g}\n({removed} removed)", rotation=0, ha="right",
                  va="center", fontsize=8)
  axes[-1, 0].set_xlabel("block")
  fig.suptitle(title or "Removed sublayers (colour: greedy step of removal; grey: kept)",
               fontsize=10)
  from matplotlib.ticker import MaxNLocator  # lazy: matplotlib, as in `pyplot`
  bar = fig.colorbar(image, ax=axes[:, 0].tolist(), label="greedy step", fraction=0.03)
  bar.locator = MaxNLocator(integer=True)
  bar.update_ticks()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def score_per_step(ranking: dict, path: str, masks: dict | None = None) -> str:
  """The score of the removed candidate at each greedy step, attention and FFN marked apart.

  masks: {ratio: keep, bool [L, 2]}, marked as cuts.
  """
  plt = pyplot()
  steps = ranking.get("steps", [])
  x = np.arange(1, len(steps) + 1)
  scores = np.asarray([float(s["score"]) for s in steps]) if steps else np.zeros(0)
  kinds = [s.get("kind", "") for s in steps]
  fig, ax = plt.subplots(figsize=(7, 3.6))
  ax.plot(x, scores, color="0.6", linewidth=1)
  for kind, marker, colour in (("attn", "o", "tab:blue"), ("ffn", "s", "tab:orange"),
                               ("block", "D", "tab:green")):
    sel = np.asarray([k == kind for k in kinds], bool)
    if sel.any():
      ax.scatter(x[sel], scores[sel], marker=marker, color=colour, s=18, label=kind, zorder=3)
  num_sub = 2 * int(ranking.get("num_layers") or 0)
  for ratio in sorted(masks or {}, key=float):
    cut = int((~np.asarray(masks[ratio], bool)).sum())
    if 0 < cut <= len(steps):
      ax.axvline(cut + 0.5, color="k", linestyle=":", linewidth=0.8)
      ax.text(cut + 0.5, ax.get_ylim()[1], f" {float(ratio):g}", va="top", fontsize=7)
  if len(scores) and (scores > 0).all() and scores.max() / max(scores.min(), 1e-30) > 50:
    ax.set_yscale("log")
  ax.set_xlabel("greedy step" + (f" (of {num_sub} sublayers)" if num_sub else ""))
  ax.set_ylabel(ranking.get("metric", "score"))
  ax.set_title("Score of the removed sublayer per step", fontsize=10)
  if kinds:
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_healing(history: dict, path: str) -> str:
  """A healing run's training loss per step and its held-out loss."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  steps = history.get("steps", [])
  if steps:
    ax.plot([s["step"] + 1 for s in steps], [s["loss"] for s in steps], color="tab:blue",
            linewidth=1, label="training (batch)")
  held = history.get("heldout", [])
  if held:
    ax.plot([h["step"] for h in held], [h["loss"] for h in held], "o-", color="tab:orange",
            label="held-out")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("next-token loss (nats)")
  ax.set_title("Healing", fontsize=10)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def metrics_vs_ratio(results: dict, path: str) -> str:
  """Benchmark average (and each task, faint) and held-out perplexity against the ratio, with
  the dense model as a reference line."""
  plt = pyplot()
  models = results["models"]
  dense = models.get("dense", {})
  pruned = sorted((m for k, m in models.items() if k != "dense"), key=lambda m: m["ratio"])
  series = ([dense] if dense else []) + pruned
  ratios = [m["ratio"] for m in series]
  has_ppl = any("perplexity" in m for m in series)
  fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(11 if has_ppl else 6, 3.8),
                           squeeze=False)
  ax = axes[0, 0]
  tasks = sorted({t for m in series for t in m.get("benchmarks", {})})
  for t in tasks:
    pts = [(m["ratio"], m["benchmarks"][t]["value"]) for m in series if t in m.get("benchmarks",
                                                                               {})]
    if len(pts) > 1:
      ax.plot(*zip(*pts), linewidth=0.8, alpha=0.35, label=DISPLAY.get(t, t))
  avg_pts = [(m["ratio"], m["average"]) for m in series if m.get("average") is not None]
  if avg_pts:
    ax.plot(*zip(*avg_pts), "o-", color="k", linewidth=2, label="average")
  if dense.get("average") is not None:
    ax.axhline(dense["average"], color="tab:red", linestyle="--", linewidth=1, label="dense")
  ax.set_xlabel("pruning ratio (fraction of sublayers removed)")
  ax.set_ylabel("accuracy (paper metric)")
  ax.set_title("Benchmarks vs ratio", fontsize=10)
  ax.legend(fontsize=7, ncol=2)
  if has_ppl:
    ax = axes[0, 1]
    pts = [(m["ratio"], m["perplexity"]["perplexity"]) for m in series if "perplexity" in m]
    ax.plot(*zip(*pts), "o-", color="tab:purple", label="held-out perplexity")
    if "perplexity" in dense:
      ax.axhline(dense["perplexity"]["perplexity"], color="tab:red", linestyle="--",
                 linewidth=1, label="dense")
    values = [v for _, v in pts]
    if max(values) / max(min(values), 1e-9) > 10:
      ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (fraction of sublayers removed)")
    ax.set_ylabel("perplexity")
    ax.set_title("Held-out perplexity vs ratio", fontsize=10)
    ax.legend(fontsize=8)
  if ratios:
    for a in axes[0]:
      a.set_xticks(sorted(set(ratios)))
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def make_plots(run: RunDir, ranking: Ranking | dict | None, masks: dict, results: dict | None,
               model_name: str | None = None) -> dict:
  """Every picture a run supports; returns {name: path}. `ranking`: a `Ranking` or ranking.json's
  content; masks: {ratio: keep, bool [L, 2]}."""
  if isinstance(ranking, Ranking):
    ranking = ranking.to_json()
  out = {}
  if ranking is not None and masks:
    name = model_name or os.path.basename(str(ranking.get("model", "")))
    out["layer_map"] = layer_map(ranking, masks, run.plot_file("layer_map"),
                                 f"{name}: removed sublayers (colour: greedy step; grey: kept)")
  if ranking is not None and ranking.get("steps"):
    out["scores"] = score_per_step(ranking, run.plot_file("scores"), masks)
  if results is not None and results.get("models"):
    out["metrics_vs_ratio"] = metrics_vs_ratio(results, run.plot_file("metrics_vs_ratio"))
  return out
