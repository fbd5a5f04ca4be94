"""The comparison's report: per method and ratio, what was removed, parameters, held-out
perplexity, every benchmark with its standard error, the average and its percent of the dense
model; as `comparison.json`, `comparison.md` and three pictures.

The random methods are summarised over their seeds: the mean, and the standard deviation across
seeds as their spread (each seed's own standard errors are in its run directory).
"""
from __future__ import annotations

import math
import os

import numpy as np

from finercut_jax.evaluation.harness_tasks import DISPLAY, PAPER_METRIC
from finercut_jax.evaluation.plots import pyplot
from finercut_jax.rundir import COMPARISON_PLOTS, ComparisonDir
from finercut_jax.search.baselines import get_method, units_removed


def _model_summary(entry: dict, tasks: list[str]) -> dict:
  """One evaluated model: what it holds, its perplexity and its benchmarks."""
  keep = np.asarray(entry["keep"], bool)
  bench = entry.get("benchmarks", {})
  out = {"removed_sublayers": int((~keep).sum()), "removed_attn": int((~keep[:, 0]).sum()),
         "removed_ffn": int((~keep[:, 1]).sum()),
         "removed_blocks": int((~keep).all(axis=1).sum()),
         "num_params": entry.get("num_params"),
         "perplexity": entry.get("perplexity", {}).get("perplexity"),
         "benchmarks": {t: {"metric": bench[t]["metric"], "value": bench[t]["value"],
                            "stderr": bench[t].get("stderr")} for t in tasks if t in bench}}
  values = [out["benchmarks"][t]["value"] for t in tasks if t in out["benchmarks"]]
  errors = [out["benchmarks"][t]["stderr"] for t in tasks if t in out["benchmarks"]]
  out["average"] = float(np.mean(values)) if values else None
  # The average of independent task means: its standard error from theirs.
  out["average_stderr"] = (math.sqrt(sum(e * e for e in errors)) / len(errors)
                           if errors and all(e is not None for e in errors) else None)
  return out


def _over_seeds(runs: list[dict]) -> dict:
  """The mean of each number over seeds, with `<name>_spread` (standard deviation) beside it."""
  if len(runs) == 1:
    return runs[0]
  out = {"seeds": len(runs)}
  for key in ("removed_sublayers", "removed_attn", "removed_ffn", "removed_blocks", "num_params",
              "perplexity", "average"):
    values = [r[key] for r in runs if r.get(key) is not None]
    if values:
      out[key] = float(np.mean(values))
      out[f"{key}_spread"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  out["average_stderr"] = None
  out["benchmarks"] = {}
  for t in runs[0]["benchmarks"]:
    values = [r["benchmarks"][t]["value"] for r in runs]
    out["benchmarks"][t] = {"metric": runs[0]["benchmarks"][t]["metric"],
                            "value": float(np.mean(values)), "stderr": None,
                            "spread": float(np.std(values, ddof=1))}
  return out


def summarize(job, dense: dict, evaluations: dict, directories: dict, ratios, eval_config) -> dict:
  """comparison.json's content from the dense entry and each method's `evaluate_run` results."""
  tasks = [t.strip() for t in str(eval_config.tasks).split(",") if t.strip()]
  L = job.model_cfg.num_layers
  dense_summary = _model_summary(dense, tasks)
  methods = {}
  for name, results in evaluations.items():
    method = get_method(name)
    per_ratio = {}
    for r in ratios:
      key = f"{r:g}"
      runs = [_model_summary(res["models"][key], tasks) for res in results]
      summary = _over_seeds(runs)
      summary["units"] = units_removed(method, r, L)
      if dense_summary["average"] and summary.get("average") is not None:
        summary["percent_of_dense"] = 100.0 * summary["average"] / dense_summary["average"]
      per_ratio[key] = summary
    methods[name] = {"description": method.description, "unit": method.unit,
                     "directories": [os.path.relpath(d, os.path.dirname(directories[name][0]))
                                     for d in directories[name]],
                     "ratios": per_ratio}
  return {"model": job.model_path, "num_layers": L, "calibration_tokens": list(job.tokens.shape),
          "ratios": [float(r) for r in ratios], "tasks": tasks,
          "limit": int(eval_config.limit) or None, "dense": dense_summary, "methods": methods}


# ----------------------------------------------------------------------------- writing


def _pct(x, err=None, spread=None) -> str:
  if x is None:
    return "–"
  text = f"{100 * x:.1f}"
  if err is not None and not math.isnan(err):
    text += f" ± {100 * err:.1f}"
  elif spread is not None:
    text += f" (sd {100 * spread:.1f})"
  return text


def render(result: dict) -> str:
  tasks, L = result["tasks"], result["num_layers"]
  dense = result["dense"]
  lines = [f"# Pruning methods compared: {os.path.basename(str(result['model']))}", "",
           f"- {L} blocks = {2 * L} sublayers; calibration {result['calibration_tokens'][0]} x "
           f"{result['calibration_tokens'][1]} tokens, the same for every method",
           f"- evaluation: {result['limit'] or 'all'} documents per task; accuracies in percent "
           f"(the paper's metric per task) ± the standard error of the mean; random methods: "
           f"the mean over seeds (sd: spread across seeds)",
           "- block methods remove the whole-block count nearest to the ratio (`units`); "
           "sublayer methods remove `int(ratio * 2L)` sublayers", ""]
  head = (["Method", "Removed (attn/ffn)", "Params (M)", "Perplexity"]
          + [f"{DISPLAY.get(t, t)} ({PAPER_METRIC.get(t, 'acc')})" for t in tasks]
          + ["Avg", "% dense"])
  sep = "|" + "---|" * len(head)

  def row(name, s):
    cells = [name, f"{s.get('removed_sublayers', 0):g} ({s.get('removed_attn', 0):g}/"
             f"{s.get('removed_ffn', 0):g})",
             f"{s['num_params'] / 1e6:.4g}" if s.get("num_params") else "–",
             f"{s['perplexity']:.2f}" if s.get("perplexity") is not None else "–"]
    for t in tasks:
      b = s["benchmarks"].get(t)
      cells.append(_pct(b["value"], b.get("stderr"), b.get("spread")) if b else "–")
    cells.append(_pct(s.get("average"), s.get("average_stderr"), s.get("average_spread")))
    cells.append(f"{s['percent_of_dense']:.1f}" if s.get("percent_of_dense") else "100.0"
                 if s is dense else "–")
    return "| " + " | ".join(cells) + " |"

  for ratio in result["ratios"]:
    key = f"{ratio:g}"
    lines += [f"## Ratio {key} ({int(ratio * 2 * L)} of {2 * L} sublayers)", "",
              "| " + " | ".join(head) + " |", sep, row("dense", dense)]
    ranked = sorted(result["methods"].items(),
                    key=lambda kv: -(kv[1]["ratios"][key].get("average") or 0))
    for name, m in ranked:
      lines.append(row(name, m["ratios"][key]))
    lines.append("")
  lines += ["## Methods", ""] + [f"- `{n}`: {m['description']} (unit: {m['unit']})"
                                 for n, m in result["methods"].items()]
  lines += ["", f"![average accuracy]({COMPARISON_PLOTS['average']})",
            f"![perplexity]({COMPARISON_PLOTS['perplexity']})",
            f"![layer maps]({COMPARISON_PLOTS['layer_maps']})", ""]
  return "\n".join(lines)


def plot(result: dict, directory: ComparisonDir, masks: dict) -> None:
  """Average accuracy and perplexity against the ratio (one line per method, dense dashed), and
  every method's removed sublayers at every ratio side by side.

  masks: {method: {ratio: keep, bool [L, 2]}}.
  """
  plt = pyplot()
  ratios = result["ratios"]
  for key, ylabel, log in (("average", "average accuracy", False),
                           ("perplexity", "held-out perplexity", True)):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, m in result["methods"].items():
      pts = [(0.0, result["dense"][key])] + [(r, m["ratios"][f"{r:g}"].get(key)) for r in ratios]
      pts = [(r, v) for r, v in pts if v is not None]
      if pts:
        ax.plot(*zip(*pts), "o-" if m["unit"] == "sublayers" else "s--", label=name,
                linewidth=2.2 if name.startswith("finercut") else 1.2)
    if result["dense"].get(key) is not None:
      ax.axhline(result["dense"][key], color="k", linestyle=":", linewidth=1, label="dense")
    if log:
      ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (fraction of sublayers)")
    ax.set_ylabel(ylabel)
    ax.set_xticks([0.0] + list(ratios))
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(directory.plot_file(key), dpi=120, bbox_inches="tight")
    plt.close(fig)

  names = list(masks)
  L = result["num_layers"]
  fig, axes = plt.subplots(len(names), len(ratios), squeeze=False,
                           figsize=(max(6.0, 0.12 * L * len(ratios) + 2), 0.55 * len(names) + 1))
  for i, name in enumerate(names):
    for j, r in enumerate(ratios):
      ax = axes[i, j]
      keep = np.asarray(masks[name][f"{r:g}"], bool)
      ax.imshow((~keep).T.astype(float), cmap="Reds", vmin=0, vmax=1.3, aspect="auto")
      ax.set_yticks([0, 1], ["attn", "ffn"], fontsize=5)
      ax.set_xticks([])
      if j == 0:
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
      if i == 0:
        ax.set_title(f"ratio {r:g}", fontsize=8)
      if i == len(names) - 1:
        ax.set_xlabel(f"block 0 .. {L - 1}", fontsize=6)
  fig.suptitle("Removed sublayers (red) per method and ratio", fontsize=9)
  fig.savefig(directory.plot_file("layer_maps"), dpi=120, bbox_inches="tight")
  plt.close(fig)


def write(directory: ComparisonDir, result: dict) -> None:
  """comparison.json, comparison.md and the pictures."""
  plot(result, directory, directory.read_method_masks(result["methods"]))
  directory.write_report(result, render(result))
