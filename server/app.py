"""The ServerApp (Flower Message API): read the run settings, run or resume the federation.

    flwr run . local-deployment --stream --run-config "recipe='tiny' run-dir='/abs/runs/x'"
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .evaluation.validation import validation_evaluator
from .federation import run_federation
from .settings import settings_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    settings = settings_from_run_config(dict(context.run_config))
    summary = run_federation(grid, settings, validation_evaluator(settings))
    logging.getLogger(__name__).info("run finished: %d rounds (%d skipped), checkpoints in %s",
                                     summary["rounds_completed"], summary["rounds_skipped"], summary["run_dir"])
    if summary["stopped"]:
        logging.getLogger(__name__).warning("run stopped early: %s", summary["stopped"])
