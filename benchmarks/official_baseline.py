"""The baseline the benchmark compares against: the official FinerCut search loop, in PyTorch.

A re-implementation (not a copy) of the greedy sublayer search of the official FinerCut code,
https://github.com/YaNgZhAnG-V5/llm_dissect (commit e1b641a), as run by its README command
`scripts/prune_layer.py --config configs/llama3_8b.yaml -x 0.4` with the default `--prune loss`,
`--prune-level am`:

- `scripts/prune_layer.py`, `greedy_pruning()` and `main()`: the loop. Candidates are the
  `o_proj` (attention) and `down_proj` (FFN) modules of every block. Per step, for every remaining
  candidate, forward hooks are put on the candidate and on every already-pruned module
  (`ForwardPrunerTestingManager.prepare_environment_mask_hook` in
  `dissect/pruners/forward_pruner.py`),
  the evaluator scores the hooked model, and the hooks are removed again (`clean_environment_hook`).
  The candidate with the smallest score is removed: `scores.index(min(scores))`, i.e. the FIRST
  minimum in candidate-list order.
- `dissect/models/masking_hook.py`, `MaskingHook`: the hook multiplies the module's output by a
  zero mask of the hidden size, so a pruned sublayer is still computed and its residual branch
  adds exactly zero.
- `dissect/evaluators/output.py`, class `Output` (config `evaluator: {type: Output,
  distance_metric: js_divergence}`): `collect_output_data()` runs the dense model once, before the
  search, over the calibration DataLoader (batch 1, no shuffle) and keeps the concatenated logits
  `[N, T, V]` on the host. The reference is NOT recomputed afterwards, but its softmax /
  log-softmax are recomputed from the stored logits at every evaluation. `evaluate()` runs the
  hooked model on each sequence separately (batch 1), moves each sequence's full logits to the host
  (`.cpu()`), concatenates them (`torch.cat` onto the running result, sequence by sequence) and
  computes the divergence on the host:
      M = (softmax(P_logits) + softmax(Q_logits)) / 2
      js = 0.5 * (kl_div(log_softmax(P_logits), M, 'mean')
                  + kl_div(log_softmax(Q_logits), M, 'mean'))
  `F.kl_div(input, target, reduction='mean')` is `mean(target * (log(target) - input))` over ALL
  N*T*V elements, so this is 0.5*[KL(M||P) + KL(M||Q)] / V averaged over positions: the KL
  direction is reversed vs the textbook JS and the value is divided by the vocabulary size.
- Logits: the official environment pins transformers 4.40, whose `LlamaForCausalLM` upcasts logits
  to float32 (`logits.float()`); transformers 5 does not, so this file upcasts on the model's
  device before the host copy, as 4.40 did. The batches carry `labels` (= input ids), so each
  forward also computes the LM loss; mirrored here (it does not change the logits).

This module mirrors all of that: `official_greedy(..., metric="js_official")` gives the official
scores (same float32 torch ops, same order), and `metric="js"` is the textbook
0.5*KL(P||M) + 0.5*KL(Q||M), summed over the vocabulary, mean over positions, float32 from
log-softmax (stable form), so the JAX scorer can be compared on either. Differences from the
official script, all optional behaviour it has and this file exposes as arguments:
- Candidate order / ties: the official list is `sorted()` module NAMES (string order: block
  "10" before "2", and within a block `mlp.down_proj` before `self_attn.o_proj`), so exact ties go
  to the first name in that order. Default here: lowest sublayer id; `tie_break="official"`
  reproduces the name order.
- Front exclusion (`-x`, `exclude_front`): see `official_greedy`. The official script ALWAYS
  excludes at least block 0 for the first step (even with -x 0.0); `exclude_front=None` (default)
  excludes nothing.
- `--eval` (on by default in the official script) re-evaluates the pruned model after every step
  on the test dataset, which in the shipped configs is the same WikiText calibration chunks, so
  the value equals the chosen candidate's score: one extra set of N forwards per step.
  `post_step_eval=True` mirrors it and reports it separately.

Calibration data (`dissect/datasets/builder.py`, `build_wikitext_dataset`;
`configs/_base_/datasets.yaml`, `wikitext`): `wikitext-2-raw-v1/train-00000-of-00001.parquet`
(the TRAIN split, though the config key says "validation"), rows with `len(text) > 0` kept
unstripped, joined with " ", tokenized once with the tokenizer's defaults (so a BOS token where the
tokenizer adds one, e.g. Llama-2/3: only the first chunk starts with it), the first N*T tokens
reshaped to `[N, T]`: N=10 contiguous, non-overlapping chunks of T=256 tokens, no padding, all-ones
attention mask. `official_calibration_tokens` reproduces that from a list of text rows.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.machine import read_status_kib

METRICS = ("js_official", "js")
KINDS = ("attn", "ffn")


# ----------------------------------------------------------------------------------------------
# Sublayers and candidate order


def sublayer_module_name(s: int) -> str:
  """The HF module whose output the official hook zeroes for sublayer id s = 2*block + k."""
  block, k = divmod(int(s), 2)
  return f"model.layers.{block}." + ("self_attn.o_proj" if k == 0 else "mlp.down_proj")


def official_candidate_order(sublayers: Sequence[int]) -> list[int]:
  """Sublayer ids in the official candidate-list order: `sorted()` of their module names."""
  return sorted((int(s) for s in sublayers), key=sublayer_module_name)


def _num_layers(hf_model) -> int:
  return int(hf_model.config.num_hidden_layers)


# ----------------------------------------------------------------------------------------------
# Calibration tokens


def official_calibration_tokens(tokenizer, texts: Sequence[str], num_samples: int = 10,
                                max_length: int = 256) -> np.ndarray:
  """The official calibration set from raw WikiText-2 rows (`datasets`' "text" column, train split).

  Rows with `len(text) > 0` are kept as they are (leading space and trailing newline included),
  joined with " ", tokenized once with the tokenizer's defaults (special tokens added: BOS for
  Llama tokenizers), and the first num_samples*max_length tokens cut into contiguous rows.

  Returns int64 [num_samples, max_length].
  """
  text = " ".join(t for t in texts if len(t) > 0)
  ids = tokenizer(text)["input_ids"]
  need = num_samples * max_length
  if len(ids) < need:
    raise ValueError(f"{len(ids)} tokens, need {need} for {num_samples} x {max_length}")
  return np.asarray(ids[:need], dtype=np.int64).reshape(num_samples, max_length)


# ----------------------------------------------------------------------------------------------
# Hooked forwards and divergences


class _ZeroOutput:
  """Forward hook: the module's output times a zero mask of the hidden size (as MaskingHook)."""

  def __init__(self, hidden_size: int):
    self.mask = torch.zeros(hidden_size, dtype=torch.bool)

  def __call__(self, module, inputs, output):
    out = output[0] if isinstance(output, (tuple, list)) else output
    self.mask = self.mask.to(dtype=out.dtype, device=out.device)
    if isinstance(output, (tuple, list)):
      return (output[0] * self.mask,) + tuple(output[1:])
    return output * self.mask


def add_zero_hooks(hf_model, sublayers: Sequence[int]) -> list:
  """Registers a zeroing hook on each sublayer's output projection; returns the handles."""
  hidden = int(hf_model.config.hidden_size)
  return [hf_model.get_submodule(sublayer_module_name(s)).register_forward_hook(_ZeroOutput(hidden))
          for s in sublayers]


def remove_hooks(handles: list) -> None:
  for h in handles:
    h.remove()
  handles.clear()


@torch.no_grad()
def collect_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
  """Per-sequence (batch 1) forwards; float32 logits of all positions concatenated on the host.

  tokens: int64 [N, T]. Returns float32 [N, T, V] on the CPU.
  """
  device = next(hf_model.parameters()).device
  result = None
  for row in tokens:
    ids = row[None].to(device)
    out = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    logits = out.logits.float().detach().cpu()
    # Grown one sequence at a time, as the official evaluator does.
    result = logits if result is None else torch.cat([result, logits], dim=0)
  return result


def js_official(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
  """0.5*[KL(M||P) + KL(M||Q)], mean over all position*vocab elements (official `js_divergence`).

  ref_logits, logits: float32 [N, T, V]. Returns a float32 scalar tensor.
  """
  m = 0.5 * (F.softmax(ref_logits, dim=-1) + F.softmax(logits, dim=-1))
  with warnings.catch_warnings():
    # torch warns that reduction='mean' divides by the vocabulary too: that is the official value.
    warnings.simplefilter("ignore", UserWarning)
    return 0.5 * (F.kl_div(F.log_softmax(ref_logits, dim=-1), m, reduction="mean")
                  + F.kl_div(F.log_softmax(logits, dim=-1), m, reduction="mean"))


def js_textbook(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
  """0.5*KL(P||M) + 0.5*KL(Q||M) summed over the vocabulary, mean over positions, float32.

  ref_logits, logits: [N, T, V]. Returns a float32 scalar tensor.
  """
  lp = F.log_softmax(ref_logits.float(), dim=-1)
  lq = F.log_softmax(logits.float(), dim=-1)
  lm = torch.logaddexp(lp, lq) - math.log(2.0)
  js = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
  return js.mean()


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "js_official": js_official, "js": js_textbook}


def score_pruned_set(hf_model, tokens: torch.Tensor, ref_logits: torch.Tensor,
                     pruned: Sequence[int], metric: str = "js_official") -> float:
  """One official evaluation: hooks on `pruned`, N batch-1 forwards, divergence on the host.

  tokens: int64 [N, T]; ref_logits: float32 [N, T, V] (`collect_logits` of the dense model).
  """
  handles = add_zero_hooks(hf_model, pruned)
  try:
    logits = collect_logits(hf_model, tokens)
  finally:
    remove_hooks(handles)
  return float(DIVERGENCES[metric](ref_logits, logits).item())


# ----------------------------------------------------------------------------------------------
# The greedy search


def official_greedy(hf_model, calib_tokens, num_steps: int, metric: str = "js_official",
                    candidates: Sequence[int] | None = None, *, tie_break: str = "sublayer_id",
                    exclude_front: float | None = None, post_step_eval: bool = False,
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """Greedy FinerCut sublayer removal, scored as the official code does.

  Args:
    hf_model: a transformers `LlamaForCausalLM` (any device; its logits come to the host).
    calib_tokens: `[N, T]` integer token ids (see `official_calibration_tokens`).
    num_steps: sublayers to remove.
    metric: "js_official" (the official value) or "js" (textbook JS, see module docstring).
    candidates: sublayer ids (s = 2*block + k, k=0 attention, k=1 FFN); None = all 2L.
    tie_break: "sublayer_id" (exact ties go to the lowest id) or "official" (the first in the
      official candidate list: sorted module names, excluded blocks appended when re-admitted).
    exclude_front: None = every candidate from step 0. A float x mirrors the official `-x`:
      with n candidates, blocks `0 .. int(n*x/2)` (so at least block 0, even for x=0) are left out
      until `int(n*x)+1` sublayers have been removed, then appended to the candidate list.
    post_step_eval: also re-score the pruned model after each step, as the official `--eval` does.
    log: called with one line per step.

  Returns one dict per step: step, sublayer, block, kind ("attn"/"ffn"), name (HF module), score,
  seconds (wall time of the step: every candidate's N forwards and divergence, and the choice),
  scores (sublayer -> score for every candidate of the step), num_forwards, and
  reference_seconds (the one dense pass before the search, same in every record); with
  post_step_eval also post_eval_score and post_eval_seconds.
  """
  if metric not in DIVERGENCES:
    raise ValueError(f"metric {metric!r} not in {METRICS}")
  if tie_break not in ("sublayer_id", "official"):
    raise ValueError(f"tie_break {tie_break!r}")
  L = _num_layers(hf_model)
  cands = list(range(2 * L)) if candidates is None else [int(c) for c in candidates]
  if len(set(cands)) != len(cands) or any(not 0 <= c < 2 * L for c in cands):
    raise ValueError(f"candidates must be distinct sublayer ids in [0, {2 * L})")
  cands = official_candidate_order(cands) if tie_break == "official" else sorted(cands)
  n_total = len(cands)
  if num_steps > n_total:
    raise ValueError(f"num_steps={num_steps} > {n_total} candidates")

  excluded: list[int] = []
  readmit_at = None
  if exclude_front is not None:
    n_blocks = int(n_total * exclude_front / 2) + 1
    excluded = [c for c in cands if c // 2 < n_blocks]
    cands = [c for c in cands if c // 2 >= n_blocks]
    readmit_at = int(n_total * exclude_front) + 1

  tokens = torch.as_tensor(np.asarray(calib_tokens), dtype=torch.long)
  if tokens.ndim != 2:
    raise ValueError(f"calib_tokens must be [N, T], got {tuple(tokens.shape)}")
  hf_model.eval()
  t0 = time.perf_counter()
  ref_logits = collect_logits(hf_model, tokens)  # once, before the search, as the official code
  reference_seconds = time.perf_counter() - t0

  pruned: list[int] = []
  steps: list[dict[str, Any]] = []
  for step in range(num_steps):
    if not cands:
      raise ValueError(f"no candidates left at step {step} (front exclusion still active)")
    t0 = time.perf_counter()
    order = list(cands)
    scores = [score_pruned_set(hf_model, tokens, ref_logits, [c] + pruned, metric) for c in order]
    if tie_break == "official":
      i = scores.index(min(scores))
    else:
      i = min(range(len(order)), key=lambda j: (scores[j], order[j]))
    seconds = time.perf_counter() - t0
    chosen = cands.pop(i)
    pruned.append(chosen)
    record = dict(step=step, sublayer=chosen, block=chosen // 2, kind=KINDS[chosen % 2],
                  name=sublayer_module_name(chosen), score=scores[i], seconds=seconds,
                  scores=dict(zip(order, scores)),
                  num_forwards=len(scores) * tokens.shape[0], reference_seconds=reference_seconds)
    if readmit_at is not None and len(pruned) == readmit_at:
      cands += excluded
    if post_step_eval:
      t1 = time.perf_counter()
      record["post_eval_score"] = score_pruned_set(hf_model, tokens, ref_logits, pruned, metric)
      record["post_eval_seconds"] = time.perf_counter() - t1
    steps.append(record)
    if log is not None:
      log(f"step {step}: remove {record['kind']} of block {record['block']} (sublayer {chosen}), "
          f"{metric}={record['score']:.6g}, {len(scores)} candidates, {seconds:.2f}s")
  return steps


# ----------------------------------------------------------------------------------------------
# Peak memory


def _reset_hwm() -> bool:
  """Resets this process's resident-set high-water mark (Linux >= 4.0: clear_refs "5")."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return False
  hwm, rss = read_status_kib("VmHWM"), read_status_kib("VmRSS")
  # After a reset the mark is the current RSS (plus what was touched since): never far above it.
  return hwm is not None and rss is not None and hwm <= rss + 64 * 1024


def _current_rss_bytes() -> int:
  rss = read_status_kib("VmRSS")
  if rss is not None:
    return rss * 1024
  import psutil  # lazy: the fallback where /proc is missing; not a declared dependency
  return int(psutil.Process().memory_info().rss)


class PeakMemory:
  """Peak memory of a region of code, for either side of the benchmark (torch or JAX).

      with PeakMemory() as mem:
        run()
      mem.as_dict()  # host_start_bytes, host_peak_bytes, host_peak_delta_bytes, method, device ...

  Host (what a CPU run uses; JAX's CPU buffers are host memory too): the kernel's resident-set
  high-water mark of this process, VmHWM, reset on entry through /proc/self/clear_refs, read on
  exit: every page resident at any moment counts, however brief, and nothing is sampled. Where
  that reset is unavailable, a thread samples RSS every `interval_s` (may miss spikes shorter than
  that). The peak includes the interpreter, libraries, weights and allocator caches already
  resident at entry: `host_peak_delta_bytes` (peak - RSS at entry) is the region's own growth.
  Only one PeakMemory should be active at a time (the mark is per process).

  Accelerators, when in use: torch CUDA `max_memory_allocated` (reset on entry) per device; JAX
  `peak_bytes_in_use` from `device.memory_stats()` per device, which JAX cannot reset, so it is a
  process-lifetime peak: measure each JAX configuration in a fresh process.
  """

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.method = None
    self.host_start_bytes = 0
    self.host_peak_bytes = 0
    self.torch_cuda_peak_bytes: list[int] | None = None
    self.jax_peak_bytes: list[int] | None = None
    self._stop = threading.Event()
    self._thread = None
    self._sampled_peak = 0

  def _sample(self):
    while not self._stop.is_set():
      self._sampled_peak = max(self._sampled_peak, _current_rss_bytes())
      self._stop.wait(self.interval_s)

  def __enter__(self):
    if "torch" in sys.modules and torch.cuda.is_available():
      for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)
    self.host_start_bytes = _current_rss_bytes()
    if _reset_hwm():
      self.method = "VmHWM (reset via /proc/self/clear_refs)"
    else:
      self.method = f"RSS sampled every {self.interval_s * 1e3:g} ms"
      self._sampled_peak = self.host_start_bytes
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self.host_peak_bytes = max(self._sampled_peak, _current_rss_bytes())
    else:
      self.host_peak_bytes = (read_status_kib("VmHWM") or 0) * 1024
    if "torch" in sys.modules and torch.cuda.is_available():
      self.torch_cuda_peak_bytes = [int(torch.cuda.max_memory_allocated(d))
                                    for d in range(torch.cuda.device_count())]
    if "jax" in sys.modules:
      import jax  # lazy: only in a process that already uses JAX (this one may be torch only)
      peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
      self.jax_peak_bytes = [int(p) for p in peaks if p is not None] or None
    return False

  @property
  def host_peak_delta_bytes(self) -> int:
    return self.host_peak_bytes - self.host_start_bytes

  def as_dict(self) -> dict[str, Any]:
    return dict(method=self.method, host_start_bytes=self.host_start_bytes,
                host_peak_bytes=self.host_peak_bytes,
                host_peak_delta_bytes=self.host_peak_delta_bytes,
                torch_cuda_peak_bytes=self.torch_cuda_peak_bytes,
                jax_peak_bytes=self.jax_peak_bytes)


# ----------------------------------------------------------------------------------------------


def _tiny_model(num_layers: int = 3, seed: int = 0):
  from transformers import LlamaConfig, LlamaForCausalLM  # lazy: slow import, demo only
  torch.manual_seed(seed)
  cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1)
  return LlamaForCausalLM(cfg).eval()


def main():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  model = _tiny_model()
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(4, 32))
  for metric in METRICS:
    with PeakMemory() as mem:
      steps = official_greedy(model, tokens, num_steps=3, metric=metric, log=print)
    print(f"[{metric}] ordering:", [(r["sublayer"], f"{r['kind']}{r['block']}") for r in steps])
    for r in steps:
      print(f"  step {r['step']}: scores " +
            ", ".join(f"{s}:{v:.4g}" for s, v in sorted(r["scores"].items())))
    print(f"  peak host memory {mem.host_peak_bytes / 2**20:.1f} MiB "
          f"(+{mem.host_peak_delta_bytes / 2**20:.1f} MiB over start; {mem.method})")


if __name__ == "__main__":
  main()
