"""Greedy decoding speed: this project's KV-cache decoding against transformers' PyTorch `generate`.

Same model (float32), same prompt, same number of new tokens, same CPU threads on both sides:

    python -m benchmarks.bench_decode                       # SmolLM2-135M, 1 x 64 prompt, 128 new
    python -m benchmarks.bench_decode --batch 4 --new_tokens 256 --out decode.json

Each side decodes once to warm up (JAX compiles there; the compile time is reported apart), then
`--repeats` times; the figures are medians. Tokens per second count the new tokens of every row
over the whole call (prefill included), as `generate` is timed. Both sides decode greedily from
the same ids, and the benchmark reports how many leading new tokens agree (float32 rounding can
make a near-tie argmax differ late in a long continuation).

It uses only `EvalModel.wrap` and `decode.greedy_generate`, so the same command measures an
older checkout of the project (with the same package layout) for a before/after comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.bench_scorer import load_hf_model
from benchmarks.machine import cpu_name
from finercut_jax import data
from finercut_jax.evaluation import decode
from finercut_jax.evaluation.lm import EvalModel
from finercut_jax.model import loading


def _timed(fn, repeats: int):
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return times, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default="smollm2-135m", help="a HF directory, a .gguf, or the default")
  p.add_argument("--prompt_tokens", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=None, help="CPU threads per side (None: all)")
  p.add_argument("--skip_torch", action="store_true", help="measure this project only")
  p.add_argument("--out", default=None, help="also write the figures to this JSON file")
  args = p.parse_args(argv)
  if args.threads:  # XLA sizes its CPU thread pool (when JAX first runs) from the schedulable CPUs
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  threads = len(os.sched_getaffinity(0))

  path = loading.resolve_path(args.model)
  model, tokenizer = loading.load_model(path)
  stream = data.token_stream(tokenizer, "packaged")
  B, P, M = args.batch, args.prompt_tokens, args.new_tokens
  prompts = [stream[r * P:(r + 1) * P].tolist() for r in range(B)]
  evaluator = EvalModel.wrap(model)
  # One call decodes every new token in chunks of 16 (a host check for stop strings between).
  run = lambda: decode.greedy_generate(evaluator, prompts, M)  # noqa: E731
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  times, ours = _timed(run, args.repeats)
  result = {
      "benchmark": "bench_decode", "cpu": cpu_name(), "threads": threads, "model": path,
      "batch": B, "prompt_tokens": P, "new_tokens": M, "repeats": args.repeats,
      "jax": {"first_call_seconds": first, "seconds": times,
              "median_seconds": statistics.median(times),
              "tokens_per_second": B * M / statistics.median(times)},
  }
  print(f"[jax]   {result['jax']['tokens_per_second']:8.1f} new tokens/s "
        f"(median of {args.repeats}: {statistics.median(times):.3f} s; first call, with "
        f"compilation, {first:.1f} s)", flush=True)

  if not args.skip_torch:
    import torch  # lazy: only for the transformers side (--skip_torch measures without torch)
    torch.set_num_threads(threads)
    hf = load_hf_model(path)
    ids = torch.tensor(prompts)
    gen = lambda: hf.generate(  # noqa: E731
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=M, min_new_tokens=M,
        do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
    with torch.inference_mode():
      gen()
      t_times, out = _timed(gen, args.repeats)
    theirs = out[:, P:].tolist()
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(ours, theirs)]
    result["torch"] = {"seconds": t_times, "median_seconds": statistics.median(t_times),
                       "tokens_per_second": B * M / statistics.median(t_times),
                       "threads": torch.get_num_threads()}
    result["speedup"] = result["jax"]["tokens_per_second"] / result["torch"]["tokens_per_second"]
    result["agreeing_new_tokens"] = agree
    print(f"[torch] {result['torch']['tokens_per_second']:8.1f} new tokens/s "
          f"(median of {args.repeats}: {statistics.median(t_times):.3f} s)")
    print(f"jax / torch: {result['speedup']:.2f}x; leading new tokens that agree per row: {agree} "
          f"of {M}; {result['cpu']}, {threads} threads")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
