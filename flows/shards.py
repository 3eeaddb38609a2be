"""Per-image stages split into shards over a Dask cluster (prefect-dask), merged by DVC's own run.

``saliency`` and ``infer_cam`` compute one file per image. With ``shards: N`` the pipeline flow first
maps ``python -m tasks.<stage> --shard K/N`` (K = 0..N-1) over the workers of a Dask cluster through
Prefect's ``DaskTaskRunner``, then runs the stage through DVC as always: the stage adopts the shards'
files (:mod:`core.shards`), computes anything missing and publishes, so ``dvc.lock``, the cache and
the outputs are those of a one-machine run, byte for byte.

The cluster: ``dask_address`` (``tcp://scheduler:8786``) of a running Dask scheduler whose workers
see the project at the same path (a shared file system) with its environment installed; empty = a
``LocalCluster`` of N single-threaded worker processes on this machine, each shard pinned to its
share of the cores (``taskset``, where installed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_stages import PipelineError, subprocess_env

SHARDABLE = ("saliency", "infer_cam")


def shard_command(root: Path, stage: str, shard: int, shards: int) -> list[str]:
    """The stage's ``cmd`` from dvc.yaml (this interpreter for ``python``) with ``--shard K/N``."""
    if stage not in SHARDABLE:
        raise PipelineError(f"stage '{stage}' cannot run in shards (only {', '.join(SHARDABLE)})")
    cmd = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    argv = shlex.split(cmd)
    if argv[:2] != ["python", "-m"] or "${" in cmd:
        raise PipelineError(f"stage '{stage}': cannot shard its command {cmd!r} (expected `python -m MODULE ...` "
                            "without ${...} values)")
    return [sys.executable, *argv[1:], "--shard", f"{shard}/{shards}"]


def _cores_of(shard: int, shards: int) -> set[int] | None:
    """This machine's cores for local shard ``shard`` of ``shards`` (every ``shards``-th), or None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return set(cores[shard::shards]) if len(cores) >= shards else None


@task(name="stage-shard", task_run_name="{stage} shard {shard}/{shards}", cache_policy=NO_CACHE, retries=0)
def stage_shard(stage: str, repo: str, shard: int, shards: int, pin_cores: bool) -> str:
    """Run one shard of ``stage`` in ``repo`` (on whichever Dask worker runs this task); the end of its
    output becomes the task's logs; returns its summary line; a failed shard fails the task with the
    end of its output."""
    logger = get_run_logger()
    root = Path(repo)
    cmd = shard_command(root, stage, shard, shards)
    cores = _cores_of(shard, shards) if pin_cores else None
    if cores and shutil.which("taskset"):   # not preexec_fn: unsafe in a Dask worker's threads
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cores))), *cmd]
    logger.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=root, env=subprocess_env(), capture_output=True, text=True)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    for line in lines[-20:]:
        logger.info("%s", line)
    if proc.returncode:
        raise PipelineError(f"{stage} shard {shard}/{shards} failed (exit status {proc.returncode}): "
                            + " | ".join(lines[-5:]))
    summary = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return summary[-1] if summary else ""


def dask_runner(shards: int, address: str = ""):
    """Prefect's Dask task runner: the cluster at ``address``, or a LocalCluster of ``shards`` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": shards, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="dvc-stage-shards", flow_run_name="{stage} in {shards} shards")
def stage_shards(stage: str, repo: str, shards: int, pin_cores: bool = True) -> list[str]:
    """Every shard of ``stage``, mapped over the flow's task runner (:func:`dask_runner`)."""
    futures = [stage_shard.submit(stage, repo, k, shards, pin_cores) for k in range(shards)]
    return [f.result() for f in futures]


def run_shards(stage: str, repo: str | Path, shards: int, address: str = "") -> list[str]:
    """:func:`stage_shards` on a Dask cluster (``address``, else a LocalCluster of ``shards`` workers)."""
    runner = dask_runner(shards, address)
    return stage_shards.with_options(task_runner=runner)(stage, str(repo), shards, pin_cores=not address)
