"""Evaluation of dense and pruned models: held-out perplexity, the paper's benchmarks (offline,
lm-eval-harness scoring), an lm-eval model adapter, throughput, plots and the run report.

`evaluate_run(run_dir, eval_config)` evaluates a finished search; `default_eval_config()` gives its
settings (`resolve_eval_config` fills a partial one, `run_eval_config` reads a run's), and
`result_settings` / `pending_work` say what an earlier evaluation already covers. Models are
scored through `EvalModel` (`loglikelihood` of string pairs, `encode` as lm-eval tokenizes).

Submodules: `lm` (the scoring engine), `decode` (KV-cache greedy decoding), `perplexity`,
`harness_tasks` (the benchmarks' documents and metrics), `throughput`, `plots`, `report`,
`comparison_report` (the pruning-method comparison; imported on demand), `run` (a run's whole
evaluation). The lm-eval adapter (`lm_eval_adapter.JaxLM`) needs `lm-eval` and is imported on
demand: `from finercut_jax.evaluation.lm_eval_adapter import JaxLM`.
"""
from finercut_jax.evaluation.lm import EvalModel, ScoringConfig, encode, loglikelihood
from finercut_jax.evaluation.plots import plot_healing
from finercut_jax.evaluation.run import (default_eval_config, evaluate_model, evaluate_run,
                                         heldout_for_run, pending_work, resolve_eval_config,
                                         resolve_max_length, result_settings, run_eval_config,
                                         scoring_config)

__all__ = ["EvalModel", "ScoringConfig", "default_eval_config", "encode", "evaluate_model",
           "evaluate_run", "heldout_for_run", "loglikelihood", "pending_work", "plot_healing",
           "resolve_eval_config", "resolve_max_length", "result_settings", "run_eval_config",
           "scoring_config"]
