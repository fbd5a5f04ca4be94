"""The scoring engine: how far every removal candidate moves the model's outputs from the dense
model's, one compiled program per greedy step. `divergence` holds the metrics, `programs` the pure
device programs, `planner` the host side (slots, passes, accounting), `scorer` joins them."""
from finercut_jax.scoring.divergence import METRICS, Metric
from finercut_jax.scoring.scorer import (BACKENDS, Backend, Candidate, NonFiniteError, Scorer,
                                         StepStats, enable_compilation_cache, sublayer_flops)

__all__ = ["BACKENDS", "METRICS", "Backend", "Candidate", "Metric", "NonFiniteError", "Scorer",
           "StepStats", "enable_compilation_cache", "sublayer_flops"]
