"""Benchmarks: every arm (m2r2 method or external engine) on the same prompts, each in its own worker process.

The reusable part: ``arms`` (prompts, the arm protocol, results), ``args`` (the options every benchmark
shares, the prompts they select), ``runner`` (worker processes, interleaved runs), ``stats`` (summaries,
output comparison), ``report`` (result files: JSON, markdown, chart); provenance (commit, machine,
bandwidth, pinned threads) is ``m2r2.provenance``. Each benchmark module (``decode``, ...) defines its arms
and a ``add_parser(subparsers)`` for ``m2r2 bench``.
"""

from ..provenance import measure_bandwidth, pin_threads, roofline
from .arms import ArmResult, ArmUnavailable, BenchPrompt
from .report import write_results
from .runner import run_benchmark
from .stats import summarize

__all__ = ["ArmResult", "ArmUnavailable", "BenchPrompt", "measure_bandwidth", "pin_threads", "roofline",
           "run_benchmark", "summarize", "write_results"]
