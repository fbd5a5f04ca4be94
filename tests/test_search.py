"""The greedy search and its variants against the plain reference greedy loop of finercut_ref.py.

Scores: 1e-5 relative, as in test_scorer.py (measured disagreement <= 2e-6). Orderings must be
identical; the reference's best and second-best scores differ by more than 5e-4 relative at
every step of every search here (asserted), so the score tolerance cannot flip an ordering.
"""
import json

import numpy as np
import pytest

import finercut_ref as R
from finercut_jax.scoring.scorer import Candidate, StepStats
from finercut_jax.search.greedy import (SearchSpec, SearchStateError, greedy_search, keep_mask,
                                        steps_needed)

RTOL = 1e-5
L = R.TINY.num_layers
FIELDS = {"step", "sublayer", "sublayers", "block", "kind", "score", "seconds"}


def check_margins(reference):
  margins = reference[2]
  assert margins.min() > 50 * RTOL, f"reference near a tie ({margins.min():.2g}): pick another seed"


@pytest.mark.parametrize("metric", ["js", "kl"])
def test_greedy_ordering_matches_reference(metric):
  records = (R.shared_search(metric) if metric == "js" else
             R.as_json(greedy_search(R.shared_scorer(metric), SearchSpec(num_layers=L))))
  reference = R.shared_reference_greedy(metric)
  check_margins(reference)
  R.check_search(records, reference, RTOL, metric)
  for t, r in enumerate(records):
    assert FIELDS <= set(r), set(r)
    assert r["step"] == t and r["seconds"] >= 0
    assert r["block"] == r["sublayer"] // 2
    assert r["kind"] == ("attn", "ffn")[r["sublayer"] % 2]


def test_mixtral_greedy_ordering_matches_reference():
  reference = R.shared_reference_greedy("js", family="mixtral")
  check_margins(reference)
  R.check_search(R.shared_search("js", "mixtral"), reference, RTOL, "mixtral")


def test_step_count_and_masks():
  assert steps_needed(0.25, L, "sublayers") == 3  # int(0.25 * 12)
  assert steps_needed(0.25, L, "attn") == 3  # the ratio counts all 2L sublayers
  assert steps_needed(0.5, L, "blocks") == 3  # int(0.5 * 6) blocks
  for bad in (0.0, 1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="ratio"):
      steps_needed(bad, L, "sublayers")
  records = R.as_json(greedy_search(R.shared_scorer("js"), SearchSpec(num_layers=L, num_steps=3)))
  assert [r["sublayers"] for r in records] == [r["sublayers"] for r in R.shared_search("js")[:3]]
  keep = keep_mask(L, [r["sublayers"] for r in records])
  assert keep.shape == (L, 2) and keep.sum() == 2 * L - 3
  for r in records:
    assert not keep[r["block"], r["sublayer"] % 2]


def test_spec_validation():
  with pytest.raises(ValueError, match="pool"):
    SearchSpec(num_layers=L, pool="heads")
  with pytest.raises(ValueError, match="protect_front"):
    SearchSpec(num_layers=L, protect_front=1.0)
  with pytest.raises(ValueError, match="candidates"):
    SearchSpec(num_layers=L, pool="attn", num_steps=L + 1)


# ----------------------------------------------------------------------------- resume


class Interrupt(Exception):
  pass


def test_resume_after_interrupt(tmp_path):
  state = tmp_path / "search_state.json"
  fingerprint = {"model": "tiny", "metric": "js"}
  scorer = R.shared_scorer("js")
  spec = SearchSpec(num_layers=L)
  stop_after = 5

  def interrupt(record):
    if record.step == stop_after - 1:
      raise Interrupt

  with pytest.raises(Interrupt):
    greedy_search(scorer, spec, state_path=str(state), fingerprint=fingerprint, on_step=interrupt)
  saved = json.loads(state.read_text())
  assert len(saved["steps"]) == stop_after  # each step is on disk before it is reported

  reported = []
  records = R.as_json(greedy_search(scorer, spec, state_path=str(state),
                                    fingerprint=fingerprint, on_step=reported.append))
  reported = R.as_json(reported)
  assert [r["step"] for r in reported] == list(range(2 * L))  # resumed steps reported again
  assert records[:stop_after] == saved["steps"]  # resumed, not recomputed
  full = R.shared_search("js")  # uninterrupted, same scorer settings
  assert [r["sublayers"] for r in records] == [r["sublayers"] for r in full]
  # 1e-6: the resumed steps may restart candidates from different cached states than the
  # uninterrupted run did, so float32 rounding may differ; it is the only allowed difference.
  R.assert_scores_close([r["score"] for r in records], [r["score"] for r in full], 1e-6, "resumed")
  assert json.loads(state.read_text())["steps"] == records

  # A finished search on its state file scores nothing.
  class NoScoring:
    def __getattr__(self, name):
      if name.startswith("score"):
        raise AssertionError(f"scorer.{name} used by a finished search")
      return getattr(scorer, name)
  assert R.as_json(greedy_search(NoScoring(), spec, state_path=str(state),
                                 fingerprint=fingerprint)) == records


def test_state_of_another_search_is_refused(tmp_path):
  state = tmp_path / "search_state.json"
  scorer = R.shared_scorer("js")
  spec = SearchSpec(num_layers=L, num_steps=1)
  greedy_search(scorer, spec, state_path=str(state), fingerprint={"metric": "js"})
  before = state.read_text()
  for fingerprint, other in (({"metric": "kl"}, spec),
                             ({"metric": "js"}, SearchSpec(num_layers=L, pool="attn", num_steps=1))):
    with pytest.raises(SearchStateError) as e:
      greedy_search(scorer, other, state_path=str(state), fingerprint=fingerprint)
    assert isinstance(e.value, ValueError)  # main reports it as one line
    message = str(e.value)
    assert str(state) in message and "different search" in message and "\n" not in message
  assert state.read_text() == before  # left alone


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("pool", ["attn", "ffn", "blocks"])
def test_pools(pool):
  records = R.as_json(greedy_search(R.shared_scorer("js"), SearchSpec(num_layers=L, pool=pool)))
  reference = R.shared_reference_greedy("js", pool)
  check_margins(reference)
  R.check_search(records, reference, RTOL, pool)
  assert len(records) == L
  if pool == "blocks":
    assert all(r["kind"] == "block" and r["sublayers"] == [2 * r["block"], 2 * r["block"] + 1]
               for r in records)
    keep = keep_mask(L, [r["sublayers"] for r in records[:2]])
    assert keep.sum() == 2 * L - 4 and not keep[records[0]["block"]].any()
  else:
    kind = 0 if pool == "attn" else 1
    assert all(r["kind"] == pool and r["sublayer"] % 2 == kind for r in records)
    assert all(int(s) % 2 == kind for r in records for s in r["scores"])  # only its kind scored


def test_protect_front():
  # n = 12 candidates, x = 0.45: blocks 0..int(n*x/2) = 0..2 are held out until int(n*x)+1 = 6
  # removals; the unprotected search removes sublayer 4 (block 2) at step 5, so protection
  # changes the ordering (checked below, so that this test can fail).
  x = 0.45
  records = R.as_json(greedy_search(R.shared_scorer("js"),
                                    SearchSpec(num_layers=L, protect_front=x)))
  reference = R.shared_reference_greedy("js", protect_front=x)
  check_margins(reference)
  R.check_search(records, reference, RTOL, "protect_front")
  assert reference[0] != R.shared_reference_greedy("js")[0], "protection changes nothing here"
  for r in records:
    scored_blocks = {int(s) // 2 for s in r["scores"]}
    if r["step"] < 6:
      assert min(scored_blocks) == 3 and r["block"] >= 3, r
    else:
      assert min(scored_blocks) == 0, r


def test_one_shot():
  scorer = R.shared_scorer("js")
  k = 5
  records = R.as_json(greedy_search(scorer, SearchSpec(num_layers=L, one_shot=True, num_steps=k)))
  pool = [Candidate(s, s + 1) for s in range(2 * L)]
  scores, _ = scorer.score(np.ones((L, 2), bool), pool)
  order = sorted(range(2 * L), key=lambda i: (scores[i], i))[:k]
  assert [r["sublayer"] for r in records] == order
  np.testing.assert_array_equal([r["score"] for r in records], scores[order])
  cfg, params, tokens = R.tiny_model()
  want = R.reference_scores("js", params, cfg, tokens, np.ones((L, 2), bool), pool)
  assert order == sorted(range(2 * L), key=lambda i: (want[i], i))[:k]
  # One-shot is not greedy here (so the test tells them apart).
  assert order != [r["sublayer"] for r in R.shared_search("js")[:k]]


class _TiedScorer:
  """Every candidate scores exactly the same: only the tie order decides."""

  def score_step(self, keep, candidates, bound=True):
    return (np.ones(len(candidates)), np.ones(len(candidates), bool),
            StepStats(evaluations=0, naive_evaluations=1, seconds=0.0, flops=0.0))


@pytest.mark.parametrize("tie_break", ["sublayer_id", "module_name"])
def test_exact_ties_follow_the_tie_break(tie_break):
  """Ties go to the lowest sublayer id, or, as the official code, to the first module name in
  `sorted()` order (its candidate list; `benchmarks.official_baseline` mirrors it)."""
  from benchmarks.official_baseline import official_candidate_order  # lazy: imports torch
  spec = SearchSpec(num_layers=12, num_steps=24, tie_break=tie_break)
  records = R.as_json(greedy_search(_TiedScorer(), spec))
  remaining, want = list(range(24)), []
  for _ in range(24):
    pick = (official_candidate_order(remaining) if tie_break == "module_name"
            else sorted(remaining))[0]
    want.append(pick)
    remaining.remove(pick)
  assert [r["sublayer"] for r in records] == want
  if tie_break == "module_name":
    assert want[:4] == [1, 0, 3, 2] and want[4] == 21  # ffn0, attn0, ffn1, attn1, ffn10
