"""One run, end to end: resolve a recipe, load model and data, search or baseline, write results.

The CLI and the Python API are thin layers over these functions; a ``Recipe`` is the whole
description of a run and is written, fully resolved, next to every result.

- ``context``: the loaded model, calibration pool, space and evaluator of a run (``prepare``).
- ``search``: an EvoPress search with checkpoints, warm start and the held-aside track.
- ``baselines``: a baseline's configuration and result on the same context.
- ``outputs``: the files of a run's directory, the claim on it, reading a result back.
- ``saved``: import, export and evaluate saved results.
- ``build``: ``build-db``.
"""

from .baselines import baseline_config, baseline_inputs, run_baseline
from .build import DatabaseRequest, build_database
from .context import Context, prepare, retarget
from .outputs import (CHECKPOINT, CONFIG_TXT, EXPORTED, RECIPE, RESULT, claim_output, load_checkpoint, load_result,
                      result_record, save_result)
from .saved import evaluate_results, export_config, export_result, import_config
from .search import WarmStart, run_search, warm_start

__all__ = ["baseline_config", "baseline_inputs", "run_baseline", "DatabaseRequest", "build_database", "Context",
           "prepare", "retarget", "CHECKPOINT", "CONFIG_TXT", "EXPORTED", "RECIPE", "RESULT", "claim_output",
           "load_checkpoint", "load_result", "result_record", "save_result", "evaluate_results", "export_config",
           "export_result", "import_config", "WarmStart", "run_search", "warm_start"]
