"""An lm-evaluation-harness model backed by the JAX model, dense or pruned.

    from finercut_jax.evaluation.lm_eval_adapter import JaxLM
    lm = JaxLM(model, tokenizer)            # a dense or pruned Llama, or an EvalModel
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)

Tokenization follows lm-eval 0.4.13's HFLM (its `TemplateLM` base splits context and continuation;
`tok_encode` uses the tokenizer's default special tokens), so scores match the harness's own
Hugging Face backend on the same weights. `loglikelihood` goes through the bucketed, batched,
jit-compiled scorer; `loglikelihood_rolling` uses the harness's rolling windows; `generate_until`
is greedy decoding with the KV cache (sampling is refused rather than silently ignored).
"""
from __future__ import annotations

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

from finercut_jax.evaluation.decode import greedy_generate
from finercut_jax.evaluation.lm import (EvalModel, ScoringConfig, encode, loglikelihood_tokens,
                                        prefix_token_id)


class JaxLM(TemplateLM):
  """`lm_eval.api.model.LM` over an `EvalModel`."""

  def __init__(self, model, tokenizer, *, max_length: int = 2048, max_gen_toks: int = 256,
               scoring: ScoringConfig | None = None, generate_batch_size: int = 8,
               decode_chunk: int = 16):
    super().__init__()
    self.model = EvalModel.wrap(model)
    self.tokenizer = tokenizer
    self._max_length = max_length
    self._max_gen_toks = max_gen_toks
    base = scoring or ScoringConfig()
    self.scoring = ScoringConfig(base.seq_buckets, base.slot_buckets, base.tokens_per_batch,
                                 base.max_batch, max_length)
    self.generate_batch_size = generate_batch_size
    self.decode_chunk = decode_chunk

  # -------------------------------------------------------------------------- tokenizer

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_token_id)

  @property
  def prefix_token_id(self) -> int:
    return prefix_token_id(self.tokenizer)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = encode(self.tokenizer, string, add_special_tokens)
    left = kwargs.get("left_truncate_len")
    return ids[-left:] if left else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # -------------------------------------------------------------------------- requests

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    results = loglikelihood_tokens(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                   self.scoring)
    for (key, _, _), res in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, res)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append(window)
        owner.append(i)
    scores = loglikelihood_tokens(self.model, windows, self.scoring)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, scores):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    # Same generation settings in a batch; within a group, similar prompt lengths together.
    groups: dict[str, list[int]] = {}
    prepared = []
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_gen_toks = int(kwargs.pop("max_gen_toks"))
      if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        raise NotImplementedError("JaxLM.generate_until decodes greedily; sampling "
                                  f"(gen_kwargs {gen_kwargs}) is not implemented")
      if max_gen_toks >= self.max_length:
        raise ValueError(f"max_gen_toks={max_gen_toks} must be below max_length={self.max_length}")
      ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
      prepared.append((ids, until, max_gen_toks))
      groups.setdefault(repr((sorted(until), max_gen_toks)), []).append(i)
    out = [""] * len(requests)
    for indices in groups.values():
      indices = sorted(indices, key=lambda i: -len(prepared[i][0]))
      for b0 in range(0, len(indices), self.generate_batch_size):
        batch = indices[b0:b0 + self.generate_batch_size]
        until, max_gen_toks = prepared[batch[0]][1], prepared[batch[0]][2]

        def stopped(r, new_ids, until=until):
          if self.eot_token_id in new_ids:
            return True
          text = self.tok_decode(new_ids)
          return any(term and term in text for term in until)

        generated = greedy_generate(self.model, [prepared[i][0] for i in batch], max_gen_toks,
                                    stop=stopped, chunk=self.decode_chunk,
                                    prompt_buckets=self.scoring.seq_buckets)
        for i, ids in zip(batch, generated):
          if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
          text = postprocess_generated_text(self.tok_decode(ids), until, None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out
