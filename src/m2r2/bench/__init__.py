"""Benchmarks: every arm (m2r2 method or external engine) on the same prompts, each in its own worker process.

``harness`` is the reusable part (arms, interleaved runs, summaries, result files); each benchmark
module (``decode``, ...) defines its arms and a ``add_parser(subparsers)`` for ``m2r2 bench``.
"""

from .harness import (ArmResult, ArmUnavailable, BenchPrompt, measure_bandwidth, pin_threads, roofline,
                      run_benchmark, summarize, write_results)

__all__ = ["ArmResult", "ArmUnavailable", "BenchPrompt", "measure_bandwidth", "pin_threads", "roofline",
           "run_benchmark", "summarize", "write_results"]
