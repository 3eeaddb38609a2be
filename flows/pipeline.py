"""The DVC pipeline as a Prefect flow: one Prefect task per DVC stage.

Stages run one after another in DVC's own order (DVC holds a single repo lock),
each as ``dvc repro --single-item <stage>``, so the flow and a plain
``dvc repro`` share one cache and skip the same up-to-date stages. Each stage's
output is streamed into the Prefect logs as it arrives, each task returns
whether the stage ran or was skipped as cached, and the run ends with a
markdown artifact summarising the stages and ``data/metrics/*.json``.

    python -m flows.pipeline                          # the whole pipeline
    python -m flows.pipeline --stage saliency         # just one stage
    python -m flows.pipeline --stage prepare --downstream
    python -m flows.pipeline --stage prepare --force  # rerun even if cached
    python -m flows.pipeline --set train_cls.tau=0.3 --name tau03   # a DVC experiment (dvc exp show)

Overrides (``params``: dotted params.yaml keys -> values) are validated with the project's typed
config before any stage runs (the run fails naming the key) and run as one ``dvc exp run --temp -S``:
DVC records the experiment's params, deps and metrics, and the user's params.yaml is left alone.
A stage DVC skipped ends in a state named "Cached", one that ran in "Completed"; each stage's task
waits for the previous one, so the run's graph shows the pipeline's order.

Without ``PREFECT_API_URL`` Prefect runs in ephemeral mode (no server needed);
with ``PREFECT_API_URL=http://127.0.0.1:4200/api`` the run shows up in the UI of
``prefect server start --host 127.0.0.1``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from core.config import ConfigError
from core.overrides import check_overrides, parse_assignment

# `flows/__init__.py` (imported first, as this module's package) sets the offline Prefect defaults.
from flows import PROJECT_ROOT
from flows.dvc_stages import (
    SKIPPED,
    ExperimentResult,
    PipelineError,
    StageFailedError,
    StageResult,
    check_project,
    experiment_metrics,
    is_stale,
    plan_and_status,
    plan_stages,
    read_metrics,
    run_experiment,
    run_stage,
)
from flows.report import report_images, summary_markdown
from flows.shards import SHARDABLE, run_shards

ARTIFACT_KEY = "dvc-pipeline-summary"
ALL_STAGES = "all"   # the run form's choice for "no stage": the whole pipeline
# flow-run tags read from the run's params (params.yaml and its overrides): tag -> dotted key
RUN_TAG_KEYS = {"method": "train_cls.method", "backbone": "train_cls.backbone"}


def run_tags(params_file: Path, overrides: dict[str, Any] | None) -> list[str]:
    """``method:eps``, ``backbone:...``: what the run trains, as tags to filter runs by in the UI.
    Keys a project does not have give no tag."""
    import yaml

    try:
        params = yaml.safe_load(params_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        params = {}
    tags = []
    for tag, key in RUN_TAG_KEYS.items():
        value: Any = params
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        value = (overrides or {}).get(key, value)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            tags.append(f"{tag}:{value}")
    return tags


def _add_run_tags(tags: list[str], logger) -> None:
    """Add ``tags`` to the current flow run (a run started from the UI has the deployment's only)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not tags:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            client.update_flow_run(flow_run.id, tags=sorted(set(run.tags) | set(tags)))
    except Exception as e:  # noqa: BLE001 - tags help to find runs; they must not fail one
        logger.warning("could not tag the flow run with %s: %s", ", ".join(tags), e)


def _level(line: str) -> int:
    if line.startswith("ERROR"):
        return logging.ERROR
    if line.startswith("WARNING"):
        return logging.WARNING
    return logging.INFO


# DVC caches; Prefect must not, or a cached task would hide a stage DVC wants to rerun.
@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def dvc_stage(stage: str, repo: str, force: bool = False, stale: bool | None = None):
    """Run one DVC stage; its stdout/stderr lines become this task's logs; a skipped stage ends "Cached".

    ``stale=False``: the run's ``dvc status`` found the stage up to date and nothing ran before it, so
    DVC is not started again for it."""
    logger = get_run_logger()
    if stale is False and not force:
        logger.info("stage '%s' SKIPPED (up to date) by the run's dvc status", stage)
        return Completed(name="Cached", message="up to date",
                         data=StageResult(stage=stage, status=SKIPPED, reason="up to date", seconds=0.0))
    logger.info("dvc repro --single-item %s%s", stage, " --force" if force else "")
    result = run_stage(repo, stage, force=force, was_stale=stale,
                       on_line=lambda _stream, line: logger.log(_level(line), "%s", line))
    verb = "RAN" if result.ran else "SKIPPED"
    logger.info("stage '%s' %s (%s) in %.1f s", stage, verb, result.reason, result.seconds)
    return result if result.ran else Completed(name="Cached", message=result.reason, data=result)


@task(name="dvc-experiment", task_run_name="exp run {overrides}", cache_policy=NO_CACHE, retries=0)
def dvc_experiment(repo: str, overrides: dict[str, Any], plan: list[str], name: str, targets: list[str],
                   downstream: bool, force: bool) -> ExperimentResult:
    """The overrides as one ``dvc exp run --temp``; its output lines become this task's logs."""
    logger = get_run_logger()
    result = run_experiment(repo, overrides, plan, name=name, targets=targets, downstream=downstream, force=force,
                            on_line=lambda _stream, line: logger.log(_level(line), "%s", line))
    logger.info("experiment '%s' done in %.1f s (`dvc exp show` lists it; `dvc exp apply %s` brings it into "
                "the workspace)", result.name, result.seconds, result.name)
    return result


def _run_name() -> str:
    """The flow run's name: what it runs and with which overrides."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    name = p.get("stage") or "all"
    name += "+downstream" if p.get("downstream") else ""
    name += " force" if p.get("force") else ""
    overrides = p.get("params") or {}
    return name + "".join(f" {k}={v}" for k, v in overrides.items())


@flow(name="dvc-pipeline", flow_run_name=_run_name)
def dvc_pipeline(stage: str | None = None, downstream: bool = False, force: bool = False,
                 repo: str | None = None, params: dict[str, Any] | None = None,
                 experiment: str = "", shards: int = 1, dask_address: str = "") -> list[StageResult]:
    """Run the DVC pipeline (or one stage, or a stage and its downstream) stage by stage; with
    ``params`` (``{"train_cls.tau": 0.3}``) as one DVC experiment named ``experiment`` (DVC names it
    when empty). ``repo`` is the DVC project root (default: this project). ``shards`` > 1: each
    per-image stage that will run (saliency, infer_cam) is first computed in that many shards on a Dask
    cluster (``dask_address``, or a LocalCluster; :mod:`flows.shards`), then merged by its DVC run."""
    logger = get_run_logger()
    root = Path(repo) if repo else PROJECT_ROOT
    stage = None if stage in (None, "", ALL_STAGES) else stage
    if params:   # the experiment is DVC's to plan; the workspace's status does not matter
        plan, stale = plan_stages(root, stage, downstream), set()
    else:        # one `dvc status` decides, until a stage runs
        plan, stale = plan_and_status(root, stage, downstream)
    logger.info("DVC plan in %s: %s", root, " -> ".join(plan) or "(no stages)")
    if params:
        try:
            check_overrides(root / "params.yaml", params)
        except ConfigError as e:
            logger.error("bad params override, nothing ran: %s", e)
            raise
        _add_run_tags(run_tags(root / "params.yaml", params), logger)
        if shards > 1:
            logger.warning("shards=%d is not used: an experiment runs in DVC's temporary copy of the project, "
                           "where its stages run unsharded", shards)
        exp = dvc_experiment(str(root), dict(params), plan, experiment, [stage] if stage else [], downstream,
                             force)
        _add_run_tags([f"exp:{exp.name}"], logger)
        # the experiment ran in a temporary copy: its metrics are DVC's record of it, not the workspace's files
        _publish_summary(root, f"DVC experiment {exp.name}", exp.stages, [], None, logger,
                         metrics=_experiment_metrics(root, exp.name, logger), experiment=exp.name)
        return exp.stages
    _add_run_tags(run_tags(root / "params.yaml", None), logger)
    results: list[StageResult] = []
    current: str | None = None
    previous = None
    try:
        for name in plan:
            current = name
            known = None if any(r.ran for r in results) else name in stale
            if shards > 1 and name in SHARDABLE and (force or known or (known is None and is_stale(root, name))):
                logger.info("%s: %d shards on %s", name, shards, dask_address or "a Dask LocalCluster")
                run_shards(name, root, shards, dask_address)
            previous = dvc_stage.submit(name, str(root), force, known, wait_for=[previous] if previous else None)
            results.append(previous.result())
        current = None
    finally:
        not_run = plan[len(results) + (1 if current else 0):]
        title = "DVC pipeline" + (f": {stage}" + (" and downstream" if downstream else "") if stage else "")
        _publish_summary(root, title, results, not_run, current, logger)
    ran = sum(r.ran for r in results)
    logger.info("done: %d stage(s) ran, %d skipped as cached", ran, len(results) - ran)
    return results


def _experiment_metrics(root: Path, name: str, logger) -> dict:
    try:
        return experiment_metrics(root, name)
    except (PipelineError, ValueError) as e:
        logger.warning("could not read experiment %s's metrics: %s", name, e)
        return {}


def _publish_summary(root: Path, title: str, results: list[StageResult], not_run: list[str], current: str | None,
                     logger, metrics: dict | None = None, experiment: str = "") -> None:
    """The run's artifact; ``metrics`` default to the workspace's ``data/metrics/*.json``."""
    try:
        markdown = summary_markdown(title, results, not_run, current, read_metrics(root) if metrics is None else metrics)
        if not experiment:   # an experiment ran in a temporary copy: the workspace's images are not its own
            markdown += "\n".join(report_images(root, {r.stage for r in results if r.ran})) + "\n"
        if experiment:
            markdown += (f"\nMetrics of experiment `{experiment}` as DVC recorded them; `dvc exp show` lists it "
                         f"beside the others, `dvc exp apply {experiment}` brings it into the workspace "
                         f"(runs of one experiment carry the tag `exp:{experiment}`).\n")
        create_markdown_artifact(
            key=ARTIFACT_KEY,
            markdown=markdown,
            description="Stages ran or skipped as cached, headline metrics, report images")
    except Exception as e:  # noqa: BLE001 - a summary must never hide the stage's own error
        logger.warning("could not publish the run summary artifact: %s", e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the DVC pipeline through Prefect, stage by stage (dvc repro per stage).")
    parser.add_argument("--stage", help="run only this DVC stage (name as in dvc.yaml)")
    parser.add_argument("--downstream", action="store_true",
                        help="with --stage: also run every stage that depends on it")
    parser.add_argument("--force", action="store_true",
                        help="rerun the selected stages even if DVC has them cached")
    parser.add_argument("--repo", default=str(PROJECT_ROOT),
                        help="DVC project root (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                        help="override a params key (repeatable): the run becomes a DVC experiment")
    parser.add_argument("--name", default="", help="with --set: the experiment's name")
    parser.add_argument("--shards", type=int, default=1,
                        help="compute saliency and infer_cam in N shards on a Dask cluster first (flows/shards.py)")
    parser.add_argument("--dask-address", default="",
                        help="with --shards: a running Dask scheduler (tcp://host:8786); default a LocalCluster")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    args.stage = None if args.stage == ALL_STAGES else args.stage
    if args.downstream and not args.stage:
        parser.error("--downstream needs --stage NAME")
    try:  # fail fast on a bad stage name or override, before Prefect starts its API server
        if args.stage:   # a stage name needs DVC's graph; the whole pipeline only a dvc.yaml (the flow plans it)
            plan_stages(args.repo, args.stage, args.downstream)
        else:
            check_project(args.repo)
        overrides = {".".join(path): value for path, value in map(parse_assignment, args.set)}
        check_overrides(Path(args.repo) / "params.yaml", overrides)
    except (PipelineError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = dvc_pipeline(stage=args.stage, downstream=args.downstream, force=args.force,
                               repo=args.repo, params=overrides or None, experiment=args.name,
                               shards=args.shards, dask_address=args.dask_address)
    except (StageFailedError, PipelineError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.stage}: {r.status} ({r.reason}, {r.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
