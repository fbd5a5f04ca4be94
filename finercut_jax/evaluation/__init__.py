"""Evaluation of dense and pruned models: held-out perplexity, the paper's benchmarks (offline,
lm-eval-harness scoring), an lm-eval model adapter, throughput, plots and the run report.

`evaluate_run(run_dir, eval_config)` evaluates a finished search; `default_eval_config()` gives its
settings. The lm-eval adapter (`lm_eval_adapter.JaxLM`) needs `lm-eval` and is imported on demand.
"""
from finercut_jax.evaluation.lm import EvalModel, ScoringConfig, loglikelihood
from finercut_jax.evaluation.run import default_eval_config, evaluate_model, evaluate_run

__all__ = ["EvalModel", "ScoringConfig", "loglikelihood", "default_eval_config",
           "evaluate_model", "evaluate_run"]
