"""The healing data: training windows, held-out windows, and the batches of each step.

By default the calibration text source, from after the calibration tokens and after the held-out
perplexity text; or a local text file, or an instruction data set in the Alpaca JSON format
(`[{"instruction", "input", "output"}]`, loss on the response only). Training windows that share
any 32-token span with the calibration set or the held-out text are refused. Batches are a pure
function of the step, so a resumed run sees the same data in the same order.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from finercut_jax.data import token_stream
from finercut_jax.evaluation.lm import encode

OVERLAP_NGRAM = 32


@dataclasses.dataclass
class TrainingData:
  """Windows `[W, T]` of token ids, the positions whose next token is a target `[W, T]`, and
  held-out windows for the held-out loss.

  tokens: int32 [W, T]; mask: bool [W, T]; heldout: int [H, T]; heldout_mask: bool [H, T]."""
  tokens: np.ndarray
  mask: np.ndarray
  heldout: np.ndarray
  heldout_mask: np.ndarray
  info: dict


def _ngrams(tokens: np.ndarray, n: int) -> set[bytes]:
  """Every n-token span of a 1-D array, as bytes."""
  tokens = np.ascontiguousarray(np.asarray(tokens, np.int64).reshape(-1))
  if len(tokens) < n:
    return {tokens.tobytes()} if len(tokens) else set()
  view = np.lib.stride_tricks.sliding_window_view(tokens, n)
  return {row.tobytes() for row in view}


def check_no_overlap(train: np.ndarray, train_mask: np.ndarray, protected: dict) -> None:
  """Refuses training windows that share a 32-token span with a protected text (the calibration
  set, the held-out perplexity text).

  train: int [W, T]; train_mask: bool [W, T] (windows without a target are not checked);
  protected: name -> int [N, T] or [N]."""
  seen = set()
  for w, m in zip(train, train_mask):
    seen |= _ngrams(w, OVERLAP_NGRAM) if m.any() else set()
  for name, tokens in protected.items():
    spans = set().union(*(_ngrams(row, OVERLAP_NGRAM) for row in np.atleast_2d(tokens)))
    if seen & spans:
      raise ValueError(f"the healing data shares {len(seen & spans)} spans of {OVERLAP_NGRAM} "
                       f"tokens with the {name}: healing on it would leak into what is measured; "
                       f"choose another heal.data.source")


def _alpaca_windows(tokenizer, path: str, seq_len: int):
  """One window per record of an Alpaca JSON file, prompt then response, cut at `seq_len`;
  records left without a response token are dropped. Returns tokens int32 [W, seq_len] (0
  after the end) and mask bool [W, seq_len] (the positions that predict a response token)."""
  try:
    with open(path) as f:
      records = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read an Alpaca JSON data set ({e})") from None
  if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r
                                              and "output" in r for r in records):
    raise ValueError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
  tokens = np.zeros((len(records), seq_len), np.int32)
  mask = np.zeros((len(records), seq_len), bool)
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  for i, r in enumerate(records):
    head = ("Below is an instruction that describes a task" +
            (", paired with an input that provides further context" if r.get("input") else "") +
            ". Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{r['instruction']}\n\n" +
            (f"### Input:\n{r['input']}\n\n" if r.get("input") else "") + "### Response:\n")
    prompt = encode(tokenizer, head)
    response = encode(tokenizer, r["output"], add_special_tokens=False) + eos
    ids = (prompt + response)[:seq_len]
    tokens[i, :len(ids)] = ids
    # Position j predicts token j+1: targets are the response tokens.
    mask[i, max(len(prompt) - 1, 0):len(ids) - 1] = True
  keep = mask.any(axis=1)
  return tokens[keep], mask[keep]


def training_data(tokenizer, c, run_config: dict, calibration: np.ndarray,
                  heldout_tokens: np.ndarray, heldout_source: str,
                  heldout_offset: int) -> TrainingData:
  """The healing windows, checked against the run's calibration set `[N, T]` (the first N*T
  tokens of its source) and the held-out text.

  calibration: int32 [N, T_calib]; heldout_tokens: int [M], the held-out stream that starts at
  token `heldout_offset` of `heldout_source`. The windows have T = `heal.seq_len`."""
  T = int(c.seq_len)
  calib_source = run_config.get("data", {}).get("source", "packaged")
  n_calib = int(calibration.size)
  source = c.data.source or calib_source
  heldout_windows = heldout_tokens[:len(heldout_tokens) // T * T].reshape(-1, T)
  if c.data.format == "alpaca":
    tokens, mask = _alpaca_windows(tokenizer, source, T)
    start = 0
  else:
    stream = token_stream(tokenizer, source)
    # Skip what the calibration set and the held-out text use of the same source.
    start = max([n_calib if source == calib_source else 0] +
                [heldout_offset + len(heldout_tokens)] * (source == heldout_source))
    rest = np.asarray(stream[start:], np.int32)
    count = len(rest) // T
    tokens = rest[:count * T].reshape(count, T)
    mask = np.ones_like(tokens, bool)
    mask[:, -1] = False  # the last position has no next token in its window
  need = int(c.micro_batch)
  if len(tokens) < need:
    raise ValueError(f"heal.data.source {source!r} gives {len(tokens)} training windows of "
                     f"{T} tokens (after skipping the first {start} tokens: calibration and "
                     f"held-out text); need at least heal.micro_batch={need}")
  check_no_overlap(tokens, mask, {"calibration set": calibration,
                                  "held-out perplexity text": heldout_tokens})
  h = heldout_windows[:int(c.eval_batches) * need]
  info = {"source": source, "format": c.data.format, "skipped_tokens": int(start),
          "windows": int(len(tokens)), "seq_len": T,
          "target_tokens": int(mask.sum()), "heldout_windows": int(len(h))}
  return TrainingData(tokens, mask, h, np.pad(np.ones_like(h, bool)[:, 1:], ((0, 0), (0, 1))),
                      info)


def batch_indices(step: int, batch_size: int, num_windows: int, seed: int) -> np.ndarray:
  """Window indices of optimizer step `step`: epochs of seeded permutations, a pure function of
  the step (a resumed run reads the same batches). Returns int [batch_size], in [0, num_windows).
  """
  first = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(first + len(out), num_windows)
    order = np.random.default_rng([seed, epoch]).permutation(num_windows)
    out.extend(order[offset:offset + batch_size - len(out)].tolist())
  return np.asarray(out)
