"""The official-FinerCut PyTorch baseline (benchmarks/official_baseline.py) vs a direct computation.

The direct computation is written independently here: all sequences in one batched forward,
hooks that replace the pruned sublayers' outputs by zeros, divergences in float64.
"""
import numpy as np
import pytest
import torch

from benchmarks import official_baseline as ob
from hf_tiny import make_hf_model

NUM_LAYERS, N, T = 3, 2, 16


@pytest.fixture(scope="module")
def model_and_tokens():
  # A larger init than HF's default 0.02 so that sublayers matter: divergences ~1e-3..1e-1, well
  # above float32 rounding, and no near-ties.
  model = make_hf_model("gqa_tied", seed=1, num_layers=NUM_LAYERS, initializer_range=0.15)
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(N, T))
  return model, tokens


@torch.no_grad()
def direct_logits(model, tokens, pruned):
  """All sequences at once; pruned sublayers' output projections return zeros."""
  def zero(module, inputs, output):
    return torch.zeros_like(output)
  handles = []
  for s in pruned:
    block, k = divmod(s, 2)
    layer = model.model.layers[block]
    module = layer.self_attn.o_proj if k == 0 else layer.mlp.down_proj
    handles.append(module.register_forward_hook(zero))
  try:
    return model(input_ids=torch.as_tensor(tokens)).logits.double()
  finally:
    for h in handles:
      h.remove()


def direct_divergence(ref, cur, metric):
  lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(cur, -1)
  p, q = lp.exp(), lq.exp()
  m = 0.5 * (p + q)
  lm = m.log()
  if metric == "js_official":   # 0.5*[KL(M||P) + KL(M||Q)], mean over every position*vocab element
    return (0.5 * (m * (lm - lp) + m * (lm - lq))).mean().item()
  # textbook: 0.5*KL(P||M) + 0.5*KL(Q||M), summed over the vocabulary, mean over positions
  return (0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)).mean().item()


@pytest.mark.parametrize("metric", ["js_official", "js"])
def test_scores_match_direct_computation_and_greedy(model_and_tokens, metric):
  model, tokens = model_and_tokens
  num_steps = 3
  steps = ob.official_greedy(model, tokens, num_steps=num_steps, metric=metric)
  ref = direct_logits(model, tokens, [])
  assert [r["step"] for r in steps] == list(range(num_steps))
  pruned = []
  for r in steps:
    remaining = sorted(set(range(2 * NUM_LAYERS)) - set(pruned))
    assert sorted(r["scores"]) == remaining
    for c, score in r["scores"].items():
      want = direct_divergence(ref, direct_logits(model, tokens, pruned + [c]), metric)
      assert score == pytest.approx(want, rel=1e-5, abs=0), (r["step"], c)
    # Greedy: the chosen sublayer is the argmin of its step (ties: lowest id).
    best = min(r["scores"].items(), key=lambda kv: (kv[1], kv[0]))
    assert r["sublayer"] == best[0] and r["score"] == best[1]
    assert (r["block"], r["kind"]) == (r["sublayer"] // 2, ("attn", "ffn")[r["sublayer"] % 2])
    assert r["num_forwards"] == len(remaining) * N and r["seconds"] > 0
    pruned.append(r["sublayer"])
  # Hooks are gone and the model is intact.
  assert not any(m._forward_hooks for m in model.modules())
  torch.testing.assert_close(direct_logits(model, tokens, []), ref, rtol=0, atol=0)


def test_scores_are_order_free_and_reference_is_dense(model_and_tokens):
  model, tokens = model_and_tokens
  ref = ob.collect_logits(model, torch.as_tensor(tokens))
  assert ref.dtype == torch.float32 and ref.shape == (N, T, model.config.vocab_size)
  assert ob.js_official(ref, ref).abs().item() < 1e-7
  assert ob.js_textbook(ref, ref).abs().item() < 1e-6
  a = ob.score_pruned_set(model, torch.as_tensor(tokens), ref, [1, 4], "js")
  b = ob.score_pruned_set(model, torch.as_tensor(tokens), ref, [4, 1], "js")
  assert a == b > 0


def test_official_candidate_order_and_front_exclusion(model_and_tokens):
  # sorted() module names: string order of block numbers, down_proj (ffn) before o_proj (attn).
  assert ob.official_candidate_order(range(24))[:6] == [1, 0, 3, 2, 21, 20]
  model, tokens = model_and_tokens
  # The official -x 0.0: block 0 is left out of step 0 only, then appended to the list.
  steps = ob.official_greedy(model, tokens[:, :8], num_steps=2, metric="js", exclude_front=0.0,
                             tie_break="official")
  assert sorted(steps[0]["scores"]) == [2, 3, 4, 5]
  assert sorted(steps[1]["scores"]) == sorted({0, 1, 2, 3, 4, 5} - {steps[0]["sublayer"]})


def test_official_calibration_tokens():
  class CharTokenizer:  # BOS=1, then one token per character
    def __call__(self, text):
      return {"input_ids": [1] + [ord(ch) for ch in text]}
  rows = [" = A = \n", "", " bc \n", "", " def \n"]
  toks = ob.official_calibration_tokens(CharTokenizer(), rows, num_samples=2, max_length=5)
  flat = [1] + [ord(ch) for ch in " = A = \n  bc \n  def \n"]
  np.testing.assert_array_equal(toks, np.asarray(flat[:10]).reshape(2, 5))
  with pytest.raises(ValueError):
    ob.official_calibration_tokens(CharTokenizer(), rows, num_samples=10, max_length=5)


def test_peak_memory_sees_an_allocation():
  with ob.PeakMemory() as mem:
    buf = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del buf
  assert mem.host_peak_delta_bytes >= 60 * 2**20, mem.as_dict()
