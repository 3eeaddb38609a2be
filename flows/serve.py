"""Serve the pipeline as a Prefect deployment, so runs can be started from the UI.

    make ui       # terminal 1: the Prefect server and UI on http://127.0.0.1:4200
    make serve    # terminal 2: this process; the deployment "dvc-pipeline/eps-pipeline" appears
                  # under Deployments, and "Run" opens a form with stage, downstream, force and params

A run's ``params`` (dotted params.yaml keys -> values, e.g. ``{"train_cls.tau": 0.3}``) make it a DVC
experiment (``flows.pipeline``); this process executes each run in the project root, with the same
DVC cache and lock as a plain ``dvc repro``. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from flows import PROJECT_ROOT
from flows.pipeline import dvc_pipeline

DEPLOYMENT = "eps-pipeline"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(PROJECT_ROOT), help="DVC project the runs use (default: %(default)s)")
    ap.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: %(default)s)")
    args = ap.parse_args(argv)
    dvc_pipeline.serve(name=args.name, parameters={"repo": args.repo}, tags=["eps", "dvc"],
                       description="The EPS pipeline through DVC: a stage, its downstream, or everything; "
                                   "params overrides run as a DVC experiment.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
