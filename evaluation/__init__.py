"""Metrics, figures and the sample / likelihood / eval / train commands; `load_run` reloads a finished run."""
from evaluation.run import Run, load_run

__all__ = ["Run", "load_run"]
