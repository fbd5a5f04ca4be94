"""`report.md` of a run: what was removed, what it cost, what it bought, with the pictures."""
from __future__ import annotations

import numpy as np

from finercut_jax.evaluation.harness_tasks import DISPLAY, results_table
from finercut_jax.rundir import HEALING_RECORD, Ranking


def _fmt_int(n) -> str:
  return f"{int(n):,}"


def _removed_blocks(keep) -> tuple[list[int], list[int]]:
  keep = np.asarray(keep, bool)
  return (np.flatnonzero(~keep[:, 0]).tolist(), np.flatnonzero(~keep[:, 1]).tolist())


def render(results: dict, ranking: Ranking | dict | None = None,
           run_config: dict | None = None) -> str:
  """report.md's text from eval_results.json's content, the ranking (a `Ranking` or
  ranking.json's content) and the run's config.json."""
  if isinstance(ranking, Ranking):
    ranking = ranking.to_json()
  models = results["models"]
  ordered = [models["dense"]] if "dense" in models else []
  ordered += sorted((m for k, m in models.items() if k != "dense"), key=lambda m: m["ratio"])
  L = len(ordered[0]["keep"]) if ordered else 0
  ec = results.get("eval_config", {})
  lines = [f"# FinerCut run report: {results.get('model') or ''}", ""]
  if run_config:
    d, s = run_config.get("data", {}), run_config.get("search", {})
    lines += [f"- model: `{run_config.get('model', {}).get('path')}` "
              f"({run_config.get('model', {}).get('dtype')}), {L} blocks = {2 * L} sublayers",
              f"- calibration: `{d.get('source')}`, {d.get('num_sequences')} x {d.get('seq_len')} "
              f"tokens; metric `{s.get('metric')}`, pool `{s.get('pool')}`"]
  if ranking and ranking.get("steps"):
    secs = sum(float(st.get("seconds", 0.0)) for st in ranking["steps"])
    lines.append(f"- search: {len(ranking['steps'])} greedy steps, {secs:.1f} s")
  lines.append("")

  lines += ["## Pruned models", "",
            "| Model | Removed | Attention removed (blocks) | FFN removed (blocks) |",
            "|---|---|---|---|"]
  for m in ordered:
    attn, ffn = _removed_blocks(m["keep"])
    lines.append(f"| {m['name']} | {m['num_removed']} / {2 * L} "
                 f"({len(attn)} attn, {len(ffn)} ffn) | {attn or '–'} | {ffn or '–'} |")
  lines.append("")

  # The tasks of the latest evaluation (those its average is over); results of other tasks or
  # earlier settings stay in eval_results.json.
  def current(m):
    tasks = m.get("average_tasks") or list(m["benchmarks"])
    return {t: m["benchmarks"][t] for t in tasks if t in m["benchmarks"]}

  bench_rows = [{"name": m["name"], "removed": f"{m['num_removed']}/{2 * L}",
                 "results": current(m)} for m in ordered if m.get("benchmarks")]
  if bench_rows:
    limits = ordered[0].get("limits", {})
    lim = sorted({v for v in limits.values()}, key=lambda v: (v is None, v or 0))
    lines += ["## Benchmarks", "",
              "Percent; metric per task as in the paper (acc_norm for ARC, HellaSwag, PIQA, "
              "OpenBookQA; acc otherwise), lm-eval-harness scoring. Documents per task: "
              + ", ".join(f"{DISPLAY[t]} {b['num_docs']}" for t, b in current(ordered[0]).items())
              + (f" (limit {', '.join(str(v) for v in lim)}"
                 + ("; MMLU's is per subject" if "mmlu" in limits else "") + ")"
                 if any(v is not None for v in lim) else "") + ".", "",
              results_table(bench_rows), ""]
    extra = []
    for m in ordered:
      lam = current(m).get("lambada")
      if lam:
        extra.append(f"{m['name']}: {lam['perplexity']:.2f}")
    if extra:
      lines += ["LAMBADA perplexity (target word): " + "; ".join(extra) + ".", ""]

  if any("perplexity" in m for m in ordered):
    p0 = next(m["perplexity"] for m in ordered if "perplexity" in m)
    lines += ["## Held-out perplexity", "",
              f"`{p0['source']}` tokens {p0['offset']}..{p0['offset'] + p0['num_tokens']} "
              f"(after the calibration tokens), non-overlapping windows of {p0['seq_len']}.", "",
              "| Model | Perplexity | NLL / token | Predictions |", "|---|---|---|---|"]
    for m in ordered:
      if "perplexity" in m:
        p = m["perplexity"]
        lines.append(f"| {m['name']} | {p['perplexity']:.3f} | {p['nll']:.4f} | "
                     f"{p['num_predictions']} |")
    lines.append("")

  if any("throughput" in m for m in ordered):
    t0 = next(m["throughput"] for m in ordered if "throughput" in m)
    lines += ["## What pruning buys", "",
              f"Measured on {t0['device']}: batch {t0['batch_size']}, prompt {t0['prompt_len']} "
              f"tokens, {t0['decode_steps']} greedy decode steps with the KV cache; medians of "
              f"{t0['repeats']} repeats. FLOPs are analytic forward FLOPs per token.", "",
              "| Model | Params | FLOPs/token (prefill) | FLOPs/token (decode) | Prefill tok/s | "
              "Decode tok/s | Params vs dense | Prefill speedup | Decode speedup |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in ordered:
      if "throughput" not in m:
        continue
      t = m["throughput"]
      rel = m.get("throughput_vs_dense", {})
      lines.append(
          f"| {m['name']} | {_fmt_int(t['params'])} | {t['flops_per_token_prefill'] / 1e6:.1f} M"
          f" | {t['flops_per_token_decode'] / 1e6:.1f} M | {t['prefill_tokens_per_s']:.1f} | "
          f"{t['decode_tokens_per_s']:.1f} | "
          + (f"{100 * rel['params']:.1f}% | {rel['prefill_tokens_per_s']:.2f}x | "
             f"{rel['decode_tokens_per_s']:.2f}x |" if rel else "100% | 1.00x | 1.00x |"))
    lines.append("")

  healed = results.get("healed", {})
  if healed:
    lines += ["## Healing", "",
              "The pruned model fine-tuned with `python -m finercut_jax.heal` (settings in "
              f"`{HEALING_RECORD}`), evaluated as above.", "",
              "| Ratio | Method | Steps | Held-out loss (during healing) | Perplexity | Average (%) |",
              "|---|---|---|---|---|---|"]
    by_ratio = {f"{m.get('ratio', 0):g}": m for m in ordered}
    for key, h in sorted(healed.items(), key=lambda kv: float(kv[0])):
      before = by_ratio.get(f"{float(key):g}", {})
      loss = h.get("healing_loss", {})
      fmt = lambda a, b, f: (f"{f(a)} → {f(b)}" if a is not None and b is not None  # noqa: E731
                             else (f(b) if b is not None else "–"))
      ppl = lambda m: m.get("perplexity", {}).get("perplexity")  # noqa: E731
      avg = lambda m: m.get("average")  # noqa: E731
      settings = h.get("healing", {}).get("settings", {})
      lines.append(
          f"| {float(key):g} | {settings.get('method', '?')} | {loss.get('steps', '?')} | "
          f"{fmt(loss.get('heldout_before'), loss.get('heldout_after'), lambda v: f'{v:.4f}')} | "
          f"{fmt(ppl(before), ppl(h), lambda v: f'{v:.3f}')} | "
          f"{fmt(avg(before), avg(h), lambda v: f'{100 * v:.1f}')} |")
    lines.append("")

  pics = results.get("plots", {})
  captions = {"layer_map": "Removed sublayers per ratio (colour: the greedy step that removed it)",
              "scores": "Score of the removed candidate at each greedy step",
              "metrics_vs_ratio": "Benchmark average and held-out perplexity vs pruning ratio "
                                  "(dashed: dense)"}
  if pics:
    lines += ["## Pictures", ""]
    for key, name in pics.items():
      lines += [f"![{captions.get(key, key)}]({name})", "", f"*{captions.get(key, key)}*", ""]
  if ec:
    lines += ["## Evaluation settings", "", "```", _config_text(ec), "```", ""]
  return "\n".join(lines)


def _config_text(d: dict, indent: str = "") -> str:
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out.append(f"{indent}{k}:")
      out.append(_config_text(v, indent + "  "))
    else:
      out.append(f"{indent}{k}: {v}")
  return "\n".join(out)
