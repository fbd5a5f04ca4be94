"""The run directory, the contract between the commands: one class owns every path and file of a
run (`RunDir`) or of a comparison (`ComparisonDir`), the records they hold are typed
(`RemovalStep`, `Ranking`), and every write is atomic (`atomic`)."""
from finercut_jax.rundir.atomic import RunDirectoryBusy, UnreadableFileError
from finercut_jax.rundir.layout import (COMPARISON_PLOTS, HEALING_RECORD, RUN_PLOTS, ComparisonDir,
                                        RunDir, ratio_key, ratio_name)
from finercut_jax.rundir.records import Ranking, RecordError, RemovalStep

__all__ = ["COMPARISON_PLOTS", "HEALING_RECORD", "RUN_PLOTS", "ComparisonDir", "Ranking",
           "RecordError", "RemovalStep", "RunDir", "RunDirectoryBusy", "UnreadableFileError",
           "ratio_key", "ratio_name"]
