"""exitbench: a benchmark suite for early-exit confidence measures.

The engine lives here (registry, config, tasks and metrics, model adapters,
traced decoding, trace store, replay, cost model, runner, CLI); the catalogue
lives beside it in ``tasks/``, ``measures/`` and ``hardware_profiles/``.
"""

__version__ = "0.1.0"
