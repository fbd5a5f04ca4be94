"""Removal orders: the greedy FinerCut search over the compiled scorer (`greedy`), and the
methods it is compared with (`baselines`)."""
from finercut_jax.search.greedy import (KIND_NAMES, POOLS, TIE_BREAKS, SearchSpec, SearchStateError,
                                        describe, greedy_search, keep_mask, load_state,
                                        module_name, search_fingerprint, steps_needed)

__all__ = ["KIND_NAMES", "POOLS", "TIE_BREAKS", "SearchSpec", "SearchStateError", "describe",
           "greedy_search", "keep_mask", "load_state", "module_name", "search_fingerprint",
           "steps_needed"]
