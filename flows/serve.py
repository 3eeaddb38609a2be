"""Serve the pipeline as a Prefect deployment, so runs can be started from the UI.

    make ui       # terminal 1: the Prefect server and UI on http://127.0.0.1:4200
    make serve    # terminal 2: this process; the deployment "dvc-pipeline/eps-pipeline" appears
                  # under Deployments, and "Run" opens a form with stage, downstream, force and params

The form's ``stage`` is a choice of the stages of the served repo's ``dvc.yaml`` (in the order
``dvc repro`` runs them) and "all"; restart this process after adding a stage.

A run's ``params`` (dotted params.yaml keys -> values, e.g. ``{"train_cls.tau": 0.3}``) make it a DVC
experiment (``flows.pipeline``); this process executes each run in the project root, with the same
DVC cache and lock as a plain ``dvc repro``. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from flows import PROJECT_ROOT
from flows.dvc_stages import PipelineError, plan_stages
from flows.pipeline import ALL_STAGES, dvc_pipeline

DEPLOYMENT = "eps-pipeline"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(PROJECT_ROOT), help="DVC project the runs use (default: %(default)s)")
    ap.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        stages = plan_stages(args.repo)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    deployment = dvc_pipeline.to_deployment(
        name=args.name, parameters={"repo": args.repo}, tags=["eps", "dvc"],
        description="The EPS pipeline through DVC: a stage, its downstream, or everything; "
                    "params overrides run as a DVC experiment.")
    stage_choice(deployment, stages)
    describe_shards(deployment)
    from prefect import serve

    serve(deployment)
    return 0


def stage_choice(deployment, stages: list[str]) -> None:
    """The run form's ``stage``: a drop-down of ``stages`` and "all" (the default) instead of free text;
    the server also refuses a run whose stage is not one of them."""
    schema = deployment._parameter_openapi_schema   # noqa: SLF001 - Prefect's parameter schema, sent as is
    schema.properties["stage"] = {"title": "stage", "position": schema.properties["stage"].get("position", 0),
                                  "description": "the DVC stage to run (with downstream: and what follows it)",
                                  "type": "string", "enum": [ALL_STAGES, *stages], "default": ALL_STAGES}



def describe_shards(deployment) -> None:
    """The run form's ``shards`` (at least 1) and ``dask_address``, with what they do."""
    props = deployment._parameter_openapi_schema.properties   # noqa: SLF001 - as in stage_choice
    props["shards"].update(minimum=1, description="compute saliency / infer_cam in this many shards on a Dask "
                                                  "cluster first (1 = no shards; README, Speed and scale)")
    props["dask_address"].update(description="with shards > 1: a running Dask scheduler (tcp://host:8786); "
                                             "empty = a LocalCluster of `shards` workers on this machine")


if __name__ == "__main__":
    sys.exit(main())
