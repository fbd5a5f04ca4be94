"""The run directory, the contract between the commands."""
from finercut_jax.rundir.results import save_results, write_start

__all__ = ["save_results", "write_start"]
