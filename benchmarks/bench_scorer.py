r"""Benchmark: the official FinerCut loop (PyTorch) against our scorer + greedy search (JAX).

One command times, on the same machine, model, calibration tokens and number of greedy steps:

  (a) the official loop: `official_baseline.official_greedy` on a transformers `LlamaForCausalLM`
      in float32 (loaded from the same GGUF file, or the same HF directory);
  (b) ours: `search.greedy_search` over a `scorer.Scorer`.

    python -m benchmarks.bench_scorer                          # SmolLM2-135M, 4 x 128, 15 steps
    python -m benchmarks.bench_scorer --steps 2 --num_sequences 2 --seq_len 64 --out r.json
    python -m benchmarks.bench_scorer --memory                 # peak memory vs chunk width

Each side runs in its own subprocess (one per repeat, so every JAX run compiles from cold and
peak memories never mix); this process only prepares the tokens, launches the sides, and compares
and prints their results. Both subprocesses are pinned (sched_setaffinity, set before the child
starts) to the same `--threads` CPUs: XLA's CPU thread pool is sized from the schedulable CPUs,
and the torch side calls `torch.set_num_threads(threads)`, so both use the same cores.

What is reported (per step and in total; medians over `--repeats`):
- wall time of each side and the ratio (a)/(b). (b)'s figures include JAX compilation: its first
  step compiles the step program, its setup (`Scorer(...)`: parameter placement, the dense
  reference pass and its compilation) is reported apart and counted in the total, as (a)'s dense
  reference pass is in its total. Model loading is reported but left out of the ratio.
- sublayer evaluations (one sublayer applied to one calibration sequence): (b)'s
  `StepStats.evaluations` against the naive C x 2L x N; (a) is naive by construction (every
  candidate is a full forward of all 2L sublayers on all N sequences, masked sublayers still
  computed: C x 2L x N evaluations, C x N batch-1 forwards).
- achieved FLOP/s of (b) (`StepStats.flops` / seconds) against a float32 matmul throughput
  measured in the same subprocess (jitted jnp matmuls of the LM-head, FFN and a 2048^2 shape;
  median of repeats; the best of them is the reference); (a)'s FLOP/s from the same FLOP model.
- peak host memory of each side (`official_baseline.PeakMemory`, the search region: for (a)
  `official_greedy`, for (b) `Scorer(...)` + `greedy_search`), with the RSS at its start.
- that (a) and (b) remove the same sublayers in the same order: exit status 1, and a loud
  message, if not (the results are still written).

`--memory` instead measures one scoring step of (b) per (chunk width, candidate count), each in
its own subprocess: the first call (compile + run) and a second call (run only), showing that
the peak grows with the chunk width and not with the number of candidates.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# After the path above: run as a script, this file's directory is on sys.path, not the repository.
# JAX, torch and finercut_jax (which imports JAX) are imported inside the functions that use them:
# each side's process imports only its own framework (`PeakMemory` reports JAX's device memory
# wherever JAX was imported, and torch's official side must not start JAX).
from benchmarks.machine import cpu_name, read_status_kib  # noqa: E402

MIB = 2 ** 20
SQUARE = (2048, 2048, 2048)  # a large square float32 matmul: the machine's best case


def matmul_shapes(cfg, seq_len: int) -> dict:
  """The float32 matmuls of one sequence through one block and the LM head, by name: (M, K, N,
  uses per block). The scorer and the official loop both run sequences one at a time."""
  d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  f = cfg.intermediate_size
  return {"q": (seq_len, d, q, 1), "kv": (seq_len, d, kv, 2), "o": (seq_len, q, d, 1),
          "gate_up": (seq_len, d, f, 2), "down": (seq_len, f, d, 1),
          "head": (seq_len, d, cfg.vocab_size, 0), "square": SQUARE + (0,)}


def shape_rates(matmul: dict) -> tuple[float, float]:
  """(sublayer, LM head) matmul throughput for the model's own shapes: the sublayers' is the
  FLOP-weighted harmonic mean over their projections (the rate at which a block's matmuls would
  run back to back); medians of the before/after measurements."""
  rate = lambda name: statistics.median(m[name]["flops_per_second"] for m in
                                        (matmul["before"], matmul["after"]))
  shapes = matmul["before"]["shapes"]
  layer = {k: 2.0 * m * kk * n * uses for k, (m, kk, n, uses) in shapes.items() if uses}
  return sum(layer.values()) / sum(f / rate(k) for k, f in layer.items()), rate("head")


# ============================================================================== sides (children)


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def _vm_hwm_bytes():
  kib = read_status_kib("VmHWM")
  return None if kib is None else kib * 1024


def side_official(spec: dict) -> dict:
  # lazy: torch, in the official side's process only
  import torch

  from benchmarks.official_baseline import PeakMemory, official_greedy
  torch.set_num_threads(spec["torch_threads"])
  t0 = time.perf_counter()
  hf = load_hf_model(spec["model_path"])
  load_seconds = time.perf_counter() - t0
  tokens = np.load(spec["tokens_path"])
  load_peak = _vm_hwm_bytes()
  log = functools.partial(print, "[official]", file=sys.stderr, flush=True)
  matmul_before = measure_matmul_torch(spec["matmul_repeats"], spec["matmul_shapes"])
  loadavg = _loadavg()
  t0 = time.perf_counter()
  with PeakMemory() as mem:
    steps = official_greedy(hf, tokens, spec["steps"], metric=spec["metric"], log=log)
  total = time.perf_counter() - t0
  loadavg_end = _loadavg()
  matmul = _combine_matmul(matmul_before, measure_matmul_torch(spec["matmul_repeats"], spec["matmul_shapes"]))
  return {
      "side": "official", "threads": torch.get_num_threads(),
      "cpus": sorted(os.sched_getaffinity(0)), "loadavg_start": loadavg, "loadavg_end": loadavg_end,
      "matmul": matmul,
      "load_seconds": load_seconds, "load_peak_bytes": load_peak,
      "reference_seconds": steps[0]["reference_seconds"], "search_seconds": total,
      "memory": mem.as_dict(),
      "steps": [{"step": r["step"], "sublayer": r["sublayer"], "kind": r["kind"],
                 "block": r["block"], "score": r["score"], "seconds": r["seconds"],
                 "num_candidates": len(r["scores"]), "num_forwards": r["num_forwards"],
                 "scores": {str(k): v for k, v in r["scores"].items()}} for r in steps],
  }


def load_hf_model(path: str):
  """transformers' `AutoModelForCausalLM` in float32, in eval mode, from a HF directory or a
  .gguf file (offline: local files only)."""
  # lazy: torch and transformers, for the torch side only
  import torch
  from transformers import AutoModelForCausalLM
  if path.endswith(".gguf"):
    import gguf  # lazy: as transformers
    # transformers parses the GGUF file twice and rebuilds gguf's tensor-name table per tensor
    # (~30 s for SmolLM2); both are pure functions of a read-only file, so memoizing them changes
    # only the load time (which is reported, not compared).
    gguf.get_tensor_name_map = functools.lru_cache(gguf.get_tensor_name_map)
    gguf.GGUFReader = functools.lru_cache(gguf.GGUFReader)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype=torch.float32,
        local_files_only=True)
  else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
  return model.eval()


def _matmul_summary(timer, repeats: int, shapes: dict) -> dict:
  """Median throughput (FLOP/s) of `timer(m, k, n)` over `repeats` calls per shape (by name), and
  the best."""
  out = {}
  for name, (m, k, n, _) in shapes.items():
    run = timer(m, k, n)
    run()  # compile / warm up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    out[name] = {"shape": f"{m}x{k}@{k}x{n}", "seconds_median": sec,
                 "flops_per_second": 2.0 * m * k * n / sec}
    del run
  out["best_flops_per_second"] = max(v["flops_per_second"] for v in out.values())
  out["repeats"] = repeats
  out["shapes"] = shapes
  return out


def measure_matmul_jax(repeats: int, shapes: dict) -> dict:
  """Float32 `jnp.matmul` (jitted) throughput on `shapes`."""
  # lazy: JAX, in the JAX side's process only
  import jax
  import jax.numpy as jnp
  f = jax.jit(jnp.matmul)

  def timer(m, k, n):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    return lambda: f(a, b).block_until_ready()
  return _matmul_summary(timer, repeats, shapes)


def measure_matmul_torch(repeats: int, shapes: dict) -> dict:
  """Float32 `torch.matmul` throughput on `shapes` (the official side's own yardstick)."""
  import torch  # lazy: torch, in the official side's process only

  def timer(m, k, n):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    return lambda: torch.matmul(a, b)
  return _matmul_summary(timer, repeats, shapes)


def _combine_matmul(before: dict, after: dict) -> dict:
  """Before/after-the-run measurements; the yardstick is the median of the two bests."""
  return {"before": before, "after": after,
          "best_flops_per_second": statistics.median(
              [before["best_flops_per_second"], after["best_flops_per_second"]])}


def _jax_setup(spec: dict):
  # lazy: JAX, in the JAX side's process only
  import jax
  import jax.numpy as jnp

  from finercut_jax.model import loading
  t0 = time.perf_counter()
  cfg, params = loading.load_params(spec["model_path"], jnp.float32)
  jax.block_until_ready(params)
  load_seconds = time.perf_counter() - t0
  tokens = np.load(spec["tokens_path"])
  return cfg, params, tokens, load_seconds


def side_jax(spec: dict) -> dict:
  # lazy: JAX, in the JAX side's process only (official_baseline: torch, for PeakMemory)
  import jax

  from benchmarks.official_baseline import PeakMemory
  from finercut_jax.model.modules import Llama
  from finercut_jax.scoring.scorer import Scorer
  from finercut_jax.search.greedy import SearchSpec, greedy_search
  cfg, params, tokens, load_seconds = _jax_setup(spec)
  load_peak = _vm_hwm_bytes()
  sspec = SearchSpec(num_layers=cfg.num_layers, pool="sublayers", num_steps=spec["steps"])
  marks = []

  def on_step(record):
    marks.append(time.perf_counter())
    st = record.stats
    print(f"[jax w={spec['chunk_width']}] step {record.step}: remove {record.kind} of block "
          f"{record.block} (sublayer {record.sublayer}), score={record.score:.6g}, "
          f"{record.seconds:.2f}s, evals {st['evaluations']}/{st['naive_evaluations']}",
          file=sys.stderr, flush=True)

  matmul_before = measure_matmul_jax(spec["matmul_repeats"], spec["matmul_shapes"])
  loadavg = _loadavg()
  with PeakMemory() as mem:
    t0 = time.perf_counter()
    scorer = Scorer(Llama.from_params(cfg, params), tokens, metric=spec["metric"], chunk_width=spec["chunk_width"],
                    position_block=spec["position_block"],
                    max_candidates=len(sspec.pool_candidates()), **spec["scorer_kwargs"])
    jax.block_until_ready(scorer.reference)
    t1 = time.perf_counter()
    records = greedy_search(scorer, sspec, on_step=on_step)
    t2 = time.perf_counter()
  loadavg_end = _loadavg()
  del scorer
  matmul = _combine_matmul(matmul_before, measure_matmul_jax(spec["matmul_repeats"], spec["matmul_shapes"]))
  walls = [b - a for a, b in zip([t1] + marks[:-1], marks)]
  return {
      "side": "jax", "chunk_width": spec["chunk_width"], "position_block": spec["position_block"],
      "devices": [str(d) for d in jax.devices()], "cpus": sorted(os.sched_getaffinity(0)),
      "loadavg_start": loadavg, "loadavg_end": loadavg_end,
      "load_seconds": load_seconds, "load_peak_bytes": load_peak,
      "setup_seconds": t1 - t0, "search_seconds": t2 - t1, "memory": mem.as_dict(),
      "matmul": matmul,
      "steps": [{"step": r.step, "sublayer": r.sublayer, "kind": r.kind,
                 "block": r.block, "score": r.score, "seconds": w,
                 "score_seconds": r.seconds, "stats": r.stats, "scores": r.scores,
                 "lower_bounds": list(r.lower_bounds or ())}
                for r, w in zip(records, walls)],
  }


def side_memprobe(spec: dict) -> dict:
  # lazy: JAX, in the JAX side's process only (official_baseline: torch, for PeakMemory)
  import jax

  from benchmarks.official_baseline import PeakMemory
  from finercut_jax.model.modules import Llama
  from finercut_jax.scoring.scorer import Scorer
  from finercut_jax.search.greedy import SearchSpec
  cfg, params, tokens, load_seconds = _jax_setup(spec)
  pool = SearchSpec(num_layers=cfg.num_layers).pool_candidates()
  count = len(pool) if spec["num_candidates"] in (None, 0) else spec["num_candidates"]
  candidates = pool[:count]
  keep = np.ones((cfg.num_layers, 2), bool)
  out = {"side": "memprobe", "chunk_width": spec["chunk_width"], "num_candidates": count,
         "position_block": spec["position_block"], "load_seconds": load_seconds}
  with PeakMemory() as mem:
    scorer = Scorer(Llama.from_params(cfg, params), tokens, metric=spec["metric"], chunk_width=spec["chunk_width"],
                    position_block=spec["position_block"], max_candidates=count,
                    **spec["scorer_kwargs"])
    jax.block_until_ready(scorer.reference)
  out["setup_memory"] = mem.as_dict()
  # The arrays the scorer holds for the whole search (caches, reference), by attribute.
  out["held_arrays_bytes"] = {k: int(v.nbytes) for k, v in vars(scorer).items()
                              if isinstance(v, jax.Array) and k != "params"}
  for name in ("first_call", "second_call"):
    with PeakMemory() as mem:
      scores, stats = scorer.score(keep, candidates)
    out[name] = {"memory": mem.as_dict(), "stats": stats.as_dict()}
  out["scores"] = [float(s) for s in scores]
  out["effective_position_block"] = scorer.position_block
  return out


# ============================================================================== driver


def _child(side: str, spec: dict, cpus: list[int], workdir: str, tag: str) -> dict:
  """Runs one side in a fresh interpreter pinned to `cpus`; returns its JSON result."""
  spec_path = os.path.join(workdir, f"spec_{tag}.json")
  result_path = os.path.join(workdir, f"result_{tag}.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             OMP_NUM_THREADS=str(len(cpus)), TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--spec", spec_path,
         "--result", result_path]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=_REPO, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
  try:
    rc = proc.wait()
  except BaseException:
    proc.kill()
    proc.wait()
    raise
  if rc != 0 or not os.path.exists(result_path):
    raise RuntimeError(f"the {side} side ({tag}) failed with exit status {rc}: {' '.join(cmd)}")
  with open(result_path) as f:
    result = json.load(f)
  result["process_seconds"] = time.perf_counter() - t0
  return result


def _median(xs):
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def _prepare(args):
  """Resolves the model, the step count and the calibration tokens (saved for both sides)."""
  # lazy: finercut_jax imports JAX, which the official side's process (this file) must not
  from finercut_jax import data
  from finercut_jax.model import loading
  from finercut_jax.search.greedy import steps_needed
  path = loading.resolve_path(args.model)
  cfg = loading.load_config(path)
  if args.tokens:
    tokens = np.load(args.tokens)
    if tokens.ndim != 2 or tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
      raise SystemExit(f"--tokens {args.tokens}: need [N, T] ids in [0, {cfg.vocab_size})")
    args.num_sequences, args.seq_len = tokens.shape
    args.source = args.tokens
  else:
    tokenizer = loading.load_tokenizer(path)
    tokens = data.calibration_tokens(tokenizer, args.source, args.num_sequences, args.seq_len)
  tokens_path = os.path.join(args.workdir, "tokens.npy")
  np.save(tokens_path, tokens)
  steps = args.steps or steps_needed(args.ratio, cfg.num_layers, "sublayers")
  if not 0 < steps <= 2 * cfg.num_layers:
    raise SystemExit(f"--steps {steps}: the model has {2 * cfg.num_layers} sublayers")
  info = {"model": args.model, "model_path": path, "num_layers": cfg.num_layers,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "vocab_size": cfg.vocab_size, "num_sequences": args.num_sequences,
          "seq_len": args.seq_len, "source": args.source, "steps": steps, "metric": args.metric,
          "tokens_path": tokens_path, "tokens_head": tokens[0, :8].tolist()}
  return info, cfg


def _environment(cpus) -> dict:
  env = {"python": platform.python_version(), "platform": platform.platform(),
         "cpu_count": os.cpu_count(), "cpus_used": list(cpus), "threads": len(cpus)}
  for pkg in ("jax", "jaxlib", "torch", "transformers", "numpy"):
    try:
      env[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      env[pkg] = None
  env["cpu_model"] = cpu_name()
  return env


def _cpus(args) -> list[int]:
  available = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(available)
  if threads > len(available):
    raise SystemExit(f"--threads {threads}: only {len(available)} CPUs available to this process")
  return available[:threads]


def official_flops(cfg, n: int, t: int, num_candidates: int) -> float:
  """FLOPs of C full forwards of the dense model (masked sublayers are still computed)."""
  # lazy: finercut_jax imports JAX, which the official side's process (this file) must not
  from finercut_jax.scoring.scorer import sublayer_flops
  attn, ffn, head = sublayer_flops(cfg, n, t)
  return num_candidates * (cfg.num_layers * (attn + ffn) + head)


def _summarize_jax(runs: list[dict], steps: int) -> dict:
  per_step = []
  for i in range(steps):
    rs = [r["steps"][i] for r in runs]
    st = rs[0]["stats"]
    per_step.append({
        "step": i, "sublayer": rs[0]["sublayer"], "kind": rs[0]["kind"], "block": rs[0]["block"],
        "score": rs[0]["score"], "seconds": _median([r["seconds"] for r in rs]),
        "score_seconds": _median([r["score_seconds"] for r in rs]),
        "evaluations": st["evaluations"], "naive_evaluations": st["naive_evaluations"],
        "flops": st["flops"], "head_flops": st["head_flops"],
        "sequence_fraction": st["sequence_fraction"], "passes": st["passes"],
        "padding_fraction": st["padding_fraction"], "idle_fraction": st["idle_fraction"],
        **{k: _median([r["stats"][k] for r in rs]) for k in BREAKDOWN},
        "flops_per_second": _median([r["stats"]["flops_per_second"] for r in rs]),
        "num_candidates": len(rs[0]["scores"])})
  peak = _median([r["matmul"]["best_flops_per_second"] for r in runs])
  for s in per_step:
    s["fraction_of_matmul_peak"] = s["flops_per_second"] / peak
  setup = _median([r["setup_seconds"] for r in runs])
  search = _median([r["search_seconds"] for r in runs])
  flops = sum(s["flops"] for s in per_step)
  step_sum = sum(s["seconds"] for s in per_step)
  later = per_step[1:]
  later_flops = sum(s["flops"] for s in later)
  later_sec = sum(s["score_seconds"] for s in later)
  return {
      "chunk_width": runs[0]["chunk_width"], "repeats": len(runs), "per_step": per_step,
      "breakdown": _breakdown(runs),
      "load_seconds": _median([r["load_seconds"] for r in runs]),
      "setup_seconds": setup, "search_seconds": search, "total_seconds": setup + search,
      "first_step_seconds": per_step[0]["seconds"],
      "later_steps_median_seconds": _median([s["seconds"] for s in later]),
      "evaluations": sum(s["evaluations"] for s in per_step),
      "naive_evaluations": sum(s["naive_evaluations"] for s in per_step),
      "flops": flops, "flops_per_second_incl_compile": flops / step_sum,
      "flops_per_second_after_first_step": later_flops / later_sec if later_sec else None,
      "matmul_peak_flops_per_second": peak,
      "matmul": [r["matmul"] for r in runs],
      "memory_peak_bytes": _median([r["memory"]["host_peak_bytes"] for r in runs]),
      "memory_start_bytes": _median([r["memory"]["host_start_bytes"] for r in runs]),
      "memory_method": runs[0]["memory"]["method"],
      "loadavg": [[r["loadavg_start"], r["loadavg_end"]] for r in runs],
      "orderings": [[s["sublayer"] for s in r["steps"]] for r in runs],
  }


BREAKDOWN = ("compile_seconds", "plan_seconds", "prefix_seconds", "device_seconds")


def _breakdown(runs: list[dict]) -> dict:
  """Where the search's time went, per run, then medians over runs: compilation, host planning,
  the prefix passes, the candidate programs (dispatch to results on the host), and the rest of
  the search loop; the programs' FLOP rate against the matmul-bound rate of their shapes."""
  per_run = []
  for r in runs:
    stats = [s["stats"] for s in r["steps"]]
    total = {k: sum(st[k] for st in stats) for k in BREAKDOWN}
    total["rest_seconds"] = r["search_seconds"] - sum(total.values())
    flops, head = sum(st["flops"] for st in stats), sum(st["head_flops"] for st in stats)
    busy = total["prefix_seconds"] + total["device_seconds"]
    layer_rate, head_rate = shape_rates(r["matmul"])
    matmul_bound = (flops - head) / layer_rate + head / head_rate
    total.update(
        device_calls=sum(st["passes"] + (st["prefix_seconds"] > 0) for st in stats),
        program_flops_per_second=flops / busy, layer_matmul_flops_per_second=layer_rate,
        head_matmul_flops_per_second=head_rate, fraction_of_shape_matmul_rate=matmul_bound / busy,
        head_share_of_flops=head / flops,
        padding_fraction=statistics.mean(st["padding_fraction"] for st in stats),
        idle_fraction=statistics.mean(st["idle_fraction"] for st in stats))
    per_run.append(total)
  return {k: _median([t[k] for t in per_run]) for k in per_run[0]}


def _summarize_official(runs: list[dict], cfg, info: dict) -> dict:
  steps = info["steps"]
  per_step = []
  for i in range(steps):
    rs = [r["steps"][i] for r in runs]
    c = rs[0]["num_candidates"]
    sec = _median([r["seconds"] for r in rs])
    fl = official_flops(cfg, info["num_sequences"], info["seq_len"], c)
    per_step.append({"step": i, "sublayer": rs[0]["sublayer"], "kind": rs[0]["kind"],
                     "block": rs[0]["block"], "score": rs[0]["score"], "seconds": sec,
                     "num_candidates": c, "num_forwards": rs[0]["num_forwards"],
                     "evaluations": c * 2 * cfg.num_layers * info["num_sequences"], "flops": fl,
                     "flops_per_second": fl / sec})
  ref = _median([r["reference_seconds"] for r in runs])
  step_sum = sum(s["seconds"] for s in per_step)
  flops = sum(s["flops"] for s in per_step)
  peak = _median([r["matmul"]["best_flops_per_second"] for r in runs])
  for s in per_step:
    s["fraction_of_matmul_peak"] = s["flops_per_second"] / peak
  return {
      "repeats": len(runs), "per_step": per_step, "threads": runs[0]["threads"],
      "matmul_peak_flops_per_second": peak, "matmul": [r["matmul"] for r in runs],
      "load_seconds": _median([r["load_seconds"] for r in runs]),
      "reference_seconds": ref, "search_seconds": _median([r["search_seconds"] for r in runs]),
      "total_seconds": ref + step_sum,
      "evaluations": sum(s["evaluations"] for s in per_step),
      "num_forwards": sum(s["num_forwards"] for s in per_step),
      "flops": flops, "flops_per_second": flops / step_sum,
      "memory_peak_bytes": _median([r["memory"]["host_peak_bytes"] for r in runs]),
      "memory_start_bytes": _median([r["memory"]["host_start_bytes"] for r in runs]),
      "memory_method": runs[0]["memory"]["method"],
      "loadavg": [[r["loadavg_start"], r["loadavg_end"]] for r in runs],
      "orderings": [[s["sublayer"] for s in r["steps"]] for r in runs],
  }


def _score_agreement(official_run: dict, jax_run: dict) -> list[float]:
  """Per step: max relative difference of the candidates' scores between the two sides."""
  out = []
  for a, b in zip(official_run["steps"], jax_run["steps"]):
    # Scores our search reports as lower bounds (early termination) are not compared.
    bounds = {str(s) for s in b.get("lower_bounds", ())}
    rel = [abs(a["scores"][k] - b["scores"][k]) / max(abs(a["scores"][k]), 1e-30)
           for k in a["scores"] if k in b["scores"] and k not in bounds]
    out.append(max(rel) if rel else None)
  return out


def _fmt_s(x):
  return "-" if x is None else (f"{x:.3g}" if x < 10 else f"{x:.1f}")


def _print_table(info, off, jx, agreement):
  print()
  print(f"CPU: {info.get('cpu_model')} ({info['threads']} threads each side)")
  print(f"model {info['model']} ({info['num_layers']} layers), tokens {info['num_sequences']} x "
        f"{info['seq_len']} ({info['source']}), {info['steps']} steps, metric {info['metric']}, "
        f"chunk width {jx['chunk_width']}, medians of {off['repeats']} (a) / {jx['repeats']} (b) "
        f"run(s)")
  hdr = (f"{'step':>4} {'removed':>9} {'C':>3} {'(a) s':>8} {'(b) s':>8} {'a/b':>7} "
         f"{'(b) evals/naive':>16} {'(b) GFLOP/s':>11} {'%peak':>6} {'(a) GFLOP/s':>11} "
         f"{'%peak':>6} "
         f"{'max rel diff':>12}")
  print(hdr)
  print("-" * len(hdr))
  for a, b, d in zip(off["per_step"], jx["per_step"], agreement):
    same = "" if a["sublayer"] == b["sublayer"] else f" != {b['kind']}{b['block']}"
    print(f"{a['step']:>4} {a['kind'] + str(a['block']) + same:>9} {a['num_candidates']:>3} "
          f"{_fmt_s(a['seconds']):>8} {_fmt_s(b['seconds']):>8} "
          f"{a['seconds'] / b['seconds']:>7.2f} "
          f"{b['evaluations']:>6}/{b['naive_evaluations']:<5} "
          f"({b['evaluations'] / b['naive_evaluations']:.2f}) "
          f"{b['flops_per_second'] / 1e9:>10.1f} {100 * b['fraction_of_matmul_peak']:>5.1f}% "
          f"{a['flops_per_second'] / 1e9:>11.1f} {100 * a['fraction_of_matmul_peak']:>5.1f}% "
          f"{('-' if d is None else f'{d:.1e}'):>12}")
  print("-" * len(hdr))
  print(f"(a) official: reference pass {_fmt_s(off['reference_seconds'])} s + steps "
        f"{_fmt_s(off['total_seconds'] - off['reference_seconds'])} s = "
        f"{_fmt_s(off['total_seconds'])} s; {off['evaluations']} sublayer evaluations "
        f"(naive by construction), {off['num_forwards']} batch-1 forwards; "
        f"{off['flops_per_second'] / 1e9:.1f} GFLOP/s = "
        f"{100 * off['flops_per_second'] / off['matmul_peak_flops_per_second']:.0f}% of its torch "
        f"float32 matmul peak {off['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s; torch "
        f"threads {off['threads']}; "
        f"load {_fmt_s(off['load_seconds'])} s (not counted)")
  print(f"(b) ours:     setup (placement + reference + its compile) {_fmt_s(jx['setup_seconds'])} s"
        f" + steps {_fmt_s(jx['search_seconds'])} s = {_fmt_s(jx['total_seconds'])} s; first step "
        f"(compiles) {_fmt_s(jx['first_step_seconds'])} s, later steps median "
        f"{_fmt_s(jx['later_steps_median_seconds'])} s; {jx['evaluations']}/"
        f"{jx['naive_evaluations']} evaluations ({jx['evaluations'] / jx['naive_evaluations']:.2f} "
        f"of naive); load {_fmt_s(jx['load_seconds'])} s (not counted)")
  later = jx["flops_per_second_after_first_step"]
  print(f"(b) FLOP/s: {jx['flops_per_second_incl_compile'] / 1e9:.1f} GFLOP/s incl. compile, "
        f"{'-' if later is None else f'{later / 1e9:.1f}'} GFLOP/s after the first step "
        f"({100 * (later or 0) / jx['matmul_peak_flops_per_second']:.0f}%) of its jnp float32 "
        f"matmul peak {jx['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s (best of the model's "
        f"shapes and {'x'.join(map(str, SQUARE))}, before and after)")
  b = jx["breakdown"]
  print(f"(b) where the search's time went (medians of runs): compile {_fmt_s(b['compile_seconds'])}"
        f" s, host planning {_fmt_s(b['plan_seconds'])} s, prefix passes "
        f"{_fmt_s(b['prefix_seconds'])} s, candidate programs {_fmt_s(b['device_seconds'])} s "
        f"(dispatch to results on the host; {b['device_calls']:.0f} program calls, prefix passes "
        f"included), rest of the search "
        f"loop {_fmt_s(b['rest_seconds'])} s; padding {100 * b['padding_fraction']:.1f}% of computed "
        f"(slot, sequence) pairs, idle candidate devices {100 * b['idle_fraction']:.1f}%")
  print(f"(b) device programs: {b['program_flops_per_second'] / 1e9:.1f} GFLOP/s = "
        f"{100 * b['fraction_of_shape_matmul_rate']:.0f}% of the matmul rate of their own shapes "
        f"(sublayer projections {b['layer_matmul_flops_per_second'] / 1e9:.1f}, LM head "
        f"{b['head_matmul_flops_per_second'] / 1e9:.1f} GFLOP/s, jnp float32, same process; the "
        f"LM head is {100 * b['head_share_of_flops']:.0f}% of the FLOPs)")
  later = _median([a["seconds"] / b["seconds"]
                   for a, b in zip(off["per_step"][1:], jx["per_step"][1:])])
  print(f"ratio (a)/(b): total {off['total_seconds'] / jx['total_seconds']:.2f}x; steps only "
        f"{(off['total_seconds'] - off['reference_seconds']) / jx['search_seconds']:.2f}x; steps "
        f"after the first: median per-step ratio {'-' if later is None else f'{later:.2f}x'}")
  def load(side):
    return "; ".join(f"{s[0]:.1f} -> {e[0]:.1f}" for s, e in side["loadavg"] if s and e)
  print(f"1-min load average (start -> end of the search) on {os.cpu_count()} CPUs: (a) "
        f"{load(off)}, (b) {load(jx)}")
  busy = [x for s, e in off["loadavg"] + jx["loadavg"] if s and e for x in (s[0], e[0])]
  if busy and max(busy) > info["threads"] + 1:
    print(f"  warning: other processes were running (load > this benchmark's {info['threads']} "
          f"threads + 1): timings are noisy, and multi-threaded torch suffers much more from "
          f"contention than XLA does; compare a --threads 1 run")
  print(f"peak host memory (search region; RSS at its start): (a) "
        f"{off['memory_peak_bytes'] / MIB:.0f} MiB ({off['memory_start_bytes'] / MIB:.0f}), (b) "
        f"{jx['memory_peak_bytes'] / MIB:.0f} MiB ({jx['memory_start_bytes'] / MIB:.0f}) "
        f"[{off['memory_method']}]")


def run_compare(args) -> int:
  cpus = _cpus(args)
  info, cfg = _prepare(args)
  env = _environment(cpus)
  info["threads"] = len(cpus)
  info["cpu_model"] = env.get("cpu_model")
  base = {"model_path": info["model_path"], "tokens_path": info["tokens_path"],
          "steps": info["steps"], "metric": args.metric, "threads": len(cpus),
          "torch_threads": args.torch_threads or len(cpus),
          "position_block": args.position_block, "matmul_repeats": args.matmul_repeats,
          "matmul_shapes": matmul_shapes(cfg, info["seq_len"]),
          "scorer_kwargs": args.scorer_kwargs}
  widths = [int(w) for w in args.chunk_widths.split(",")]
  print(f"[bench] {info['steps']} steps on {info['model_path']}, tokens {info['num_sequences']} x "
        f"{info['seq_len']}, metric {args.metric}, CPUs {cpus} ({len(cpus)} threads each side)",
        flush=True)
  jax_runs = {}
  for w in widths:  # ours first: fast, and a broken setup shows before the long official run
    jax_runs[w] = [_child("jax", dict(base, chunk_width=w), cpus, args.workdir, f"jax_w{w}_r{r}")
                   for r in range(args.repeats)]
  official_runs = [_child("official", base, cpus, args.workdir, f"official_r{r}")
                   for r in range(args.official_repeats or args.repeats)]
  return report(info, cfg, env, official_runs, jax_runs, args.out)


def _divergence_note(official_run: dict, jax_run: dict) -> str:
  """Where two orderings part: both choices and both sides' scores of the two sublayers."""
  for a, b in zip(official_run["steps"], jax_run["steps"]):
    if a["sublayer"] != b["sublayer"]:
      ka, kb = str(a["sublayer"]), str(b["sublayer"])
      return (f"first difference at step {a['step']}: official removes {ka} "
              f"(official {a['scores'].get(ka)!r}, ours {b['scores'].get(ka)!r}), "
              f"ours removes {kb} "
              f"(official {a['scores'].get(kb)!r}, ours {b['scores'].get(kb)!r})")
  return "orderings differ in length"


def report(info, cfg, env, official_runs, jax_runs, out=None) -> int:
  """Summarizes, prints and writes the results; 1 if the selections differ anywhere."""
  widths = list(jax_runs)
  off = _summarize_official(official_runs, cfg, info)
  results = {"benchmark": "bench_scorer", "config": info, "environment": env,
             "official": off, "jax": [], "raw": {"official": official_runs, "jax": jax_runs}}
  want = off["orderings"][0]
  mismatches = [f"official repeat {i}: {o}" for i, o in enumerate(off["orderings"]) if o != want]
  for w in widths:
    jx = _summarize_jax(jax_runs[w], info["steps"])
    agreement = _score_agreement(official_runs[0], jax_runs[w][0])
    jx["max_rel_score_diff_per_step"] = agreement
    jx["ratio_total"] = off["total_seconds"] / jx["total_seconds"]
    jx["ratio_steps_only"] = ((off["total_seconds"] - off["reference_seconds"])
                              / jx["search_seconds"])
    jx["ratio_per_step"] = [a["seconds"] / b["seconds"]
                            for a, b in zip(off["per_step"], jx["per_step"])]
    jx["same_selection"] = all(o == want for o in jx["orderings"])
    mismatches += [f"jax chunk width {w} repeat {i}: {o}; "
                   f"{_divergence_note(official_runs[0], jax_runs[w][i])}"
                   for i, o in enumerate(jx["orderings"]) if o != want]
    results["jax"].append(jx)
    _print_table(info, off, jx, agreement)
  results["same_selection"] = not mismatches
  if out:
    with open(out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nresults written to {out}")
  if mismatches:
    print("\n" + "!" * 78 + f"\nSELECTION MISMATCH: official ordering {want}\n  " +
          "\n  ".join(mismatches) + "\n" + "!" * 78, file=sys.stderr)
    return 1
  print(f"\nselection check: both sides removed the same {info['steps']} sublayers in the same "
        f"order: {', '.join(s['kind'] + str(s['block']) for s in off['per_step'])}")
  return 0


def run_memory(args) -> int:
  cpus = _cpus(args)
  info, cfg = _prepare(args)
  base = {"model_path": info["model_path"], "tokens_path": info["tokens_path"],
          "metric": args.metric, "position_block": args.position_block,
          "scorer_kwargs": args.scorer_kwargs}
  widths = [int(w) for w in args.memory_widths.split(",")]
  counts = [0 if c == "all" else int(c) for c in args.memory_candidates.split(",")]
  runs = []
  for c in counts:
    for w in widths:
      r = _child("memprobe", dict(base, chunk_width=w, num_candidates=c), cpus, args.workdir,
                 f"mem_w{w}_c{c}")
      runs.append(r)
  # Per run, from the second (run-only) call, relative to the RSS with the model loaded (before
  # Scorer(...)), which removes small per-process differences in the interpreter's baseline:
  #   retained: what the scorer holds between steps (its caches, the reference, runtime pools);
  #   working:  the step's transient working set (2nd call peak over its start);
  #   total:    2nd call peak over the loaded model = retained + working.
  for r in runs:
    base_rss = r["setup_memory"]["host_start_bytes"]
    m2 = r["second_call"]["memory"]
    r["retained_bytes"] = m2["host_start_bytes"] - base_rss
    r["working_set_bytes"] = m2["host_peak_bytes"] - m2["host_start_bytes"]
    r["total_over_model_bytes"] = m2["host_peak_bytes"] - base_rss
  n, t = info["num_sequences"], info["seq_len"]
  v = cfg.vocab_size
  pb = runs[0]["effective_position_block"]
  print()
  print(f"one scoring step of (b), all sublayers kept, {n} x {t} tokens, position block {pb}, "
        f"scorer kwargs {args.scorer_kwargs or '{}'}; peak host RSS, one subprocess per row "
        f"({runs[0]['first_call']['memory']['method']}); MiB")
  hdr = (f"{'width':>5} {'cands':>5} {'1st call peak':>13} {'2nd call peak':>13} "
         f"{'retained':>9} {'working set':>11} {'total':>7} {'held arrays':>11} "
         f"{'W*pb*V*4':>8} {'2nd call s':>10}")
  print(hdr)
  print("-" * len(hdr))
  for r in runs:
    m1, m2 = r["first_call"]["memory"], r["second_call"]["memory"]
    r["logits_block_bytes"] = r["chunk_width"] * pb * v * 4
    held = sum(r.get("held_arrays_bytes", {}).values())
    print(f"{r['chunk_width']:>5} {r['num_candidates']:>5} {m1['host_peak_bytes'] / MIB:>13.0f} "
          f"{m2['host_peak_bytes'] / MIB:>13.0f} {r['retained_bytes'] / MIB:>9.0f} "
          f"{r['working_set_bytes'] / MIB:>11.0f} {r['total_over_model_bytes'] / MIB:>7.0f} "
          f"{held / MIB:>11.0f} {r['logits_block_bytes'] / MIB:>8.0f} "
          f"{r['second_call']['stats']['seconds']:>10.2f}")
  print("retained = RSS before the 2nd call - RSS with the model loaded; working set = 2nd call "
        "peak - its start;\ntotal = retained + working set; held arrays = jax.Arrays the Scorer "
        "keeps as attributes (params excluded):")
  for r in runs:
    items = sorted(r.get("held_arrays_bytes", {}).items(), key=lambda kv: -kv[1])
    print(f"  width {r['chunk_width']}, {r['num_candidates']} candidates: " +
          (", ".join(f"{k} {b / MIB:.0f}" for k, b in items if b >= MIB) or "none >= 1 MiB"))

  cs = sorted({r["num_candidates"] for r in runs})
  ws = sorted({r["chunk_width"] for r in runs})
  verdict = {}
  for key, label in (("working_set_bytes", "working set"), ("total_over_model_bytes", "total")):
    by = {(r["chunk_width"], r["num_candidates"]): r[key] for r in runs}
    width_growth = [by[(ws[-1], c)] - by[(ws[0], c)] for c in cs] if len(ws) > 1 else []
    count_growth = [by[(w, cs[-1])] - by[(w, cs[0])] for w in ws] if len(cs) > 1 else []
    v_ = {"width_growth_bytes": width_growth, "candidate_growth_bytes": count_growth}
    line = f"{label}: "
    if width_growth:
      line += (f"width {ws[0]} -> {ws[-1]}: " + ", ".join(
          f"{g / MIB:+.0f} MiB at {c} candidates" for g, c in zip(width_growth, cs)))
    if count_growth:
      line += (f"; {cs[0]} -> {cs[-1]} candidates: " + ", ".join(
          f"{g / MIB:+.0f} MiB at width {w}" for g, w in zip(count_growth, ws)))
    if width_growth and count_growth:
      noise = 16 * MIB  # RSS differences below this are not taken as an effect
      by_count = max(count_growth) > max(noise, 0.5 * max(min(width_growth), 0))
      by_width = min(width_growth) > noise and not by_count
      v_["bounded_by_chunk_width"] = by_width
      v_["grows_with_candidates"] = by_count
      line += (" => grows with the chunk width, not the candidate count" if by_width else
               " => GROWS WITH THE CANDIDATE COUNT" if by_count else
               " => no effect above the noise (16 MiB): use a larger case")
    verdict[label.replace(" ", "_")] = v_
    print(line)
  results = {"benchmark": "bench_scorer --memory", "config": info,
             "environment": _environment(cpus),
             "runs": runs, "verdict": verdict}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nresults written to {args.out}")
  return 0


def _side_main(args) -> int:
  with open(args.spec) as f:
    spec = json.load(f)
  fn = {"official": side_official, "jax": side_jax, "memprobe": side_memprobe}[args.side]
  result = fn(spec)
  with open(args.result, "w") as f:
    json.dump(result, f)
  return 0


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Official FinerCut loop (PyTorch) vs our JAX scorer + greedy search.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default="smollm2-135m",
                 help="'smollm2-135m' (the packaged GGUF), a .gguf file, or a HF checkpoint dir")
  p.add_argument("--source", default="packaged", help="calibration text source (finercut_jax.data.text)")
  p.add_argument("--tokens", default=None,
                 help="a [N, T] .npy of token ids to use instead of --source/-N/-T")
  p.add_argument("--num_sequences", "-N", type=int, default=4)
  p.add_argument("--seq_len", "-T", type=int, default=128)
  p.add_argument("--steps", type=int, default=None,
                 help="greedy steps (None: those of --ratio; 15 for SmolLM2 at 0.25)")
  p.add_argument("--ratio", type=float, default=0.25)
  p.add_argument("--metric", default="js_official", choices=("js_official", "js"))
  p.add_argument("--chunk_widths", default="1",
                 help="comma list; (b) runs once per width (each checked against (a))")
  p.add_argument("--position_block", type=int, default=512)
  p.add_argument("--scorer_kwargs", type=json.loads, default={},
                 help='extra Scorer keyword arguments as JSON, e.g. \'{"state_memory": 0}\'')
  p.add_argument("--repeats", type=int, default=1, help="runs of each side (fresh process each)")
  p.add_argument("--official_repeats", type=int, default=None,
                 help="runs of the official side (None: --repeats; it is the slow one)")
  p.add_argument("--matmul_repeats", type=int, default=7)
  p.add_argument("--threads", type=int, default=None,
                 help="CPUs (and torch threads) for each side (None: all this process may use)")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="override torch.set_num_threads (None: --threads, i.e. matching JAX)")
  p.add_argument("--out", default=None, help="JSON results file")
  p.add_argument("--workdir", default=None, help="where specs, tokens and side results go "
                 "(None: a temporary directory, removed at the end)")
  p.add_argument("--memory", action="store_true",
                 help="peak memory of one scoring step of (b) per chunk width and candidate count")
  p.add_argument("--memory_widths", default="1,4")
  p.add_argument("--memory_candidates", default="all,8", help="comma list; 'all' = 2L")
  p.add_argument("--side", choices=("official", "jax", "memprobe"), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> int:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  args = parse_args(argv)
  if args.side:
    return _side_main(args)
  with tempfile.TemporaryDirectory(prefix="bench_scorer_") as tmp:
    if args.workdir is None:
      args.workdir = tmp
    else:
      os.makedirs(args.workdir, exist_ok=True)
    return run_memory(args) if args.memory else run_compare(args)


if __name__ == "__main__":
  sys.exit(main())
