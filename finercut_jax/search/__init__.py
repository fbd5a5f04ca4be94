"""Removal orders: the greedy FinerCut search over the compiled scorer (`greedy`), and the
methods it is compared with (`baselines`)."""
from finercut_jax.search.baselines import Method, RankingKind, Unit
from finercut_jax.search.greedy import (KIND_NAMES, POOLS, TIE_BREAKS, Pool, SearchSpec,
                                        SearchStateError, TieBreak, greedy_search, keep_mask,
                                        load_state, module_name, removal_step, search_fingerprint,
                                        steps_needed)

__all__ = ["KIND_NAMES", "POOLS", "TIE_BREAKS", "Method", "Pool", "RankingKind", "SearchSpec",
           "SearchStateError", "TieBreak", "Unit", "greedy_search", "keep_mask",
           "load_state", "module_name", "removal_step", "search_fingerprint", "steps_needed"]
