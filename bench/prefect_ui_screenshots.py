"""Screenshots of the Prefect UI driving the pipeline (README "Prefect", docs/prefect-ui/), from scratch.

    python bench/prefect_ui_screenshots.py                 # writes docs/prefect-ui/*.png
    python bench/prefect_ui_screenshots.py --out /tmp/shots

Needs Debian's ``chromium`` (``apt-get install chromium``) and this project fully cached (``dvc repro``
first: the project run below must find every stage up to date). A Prefect server is started on a free
127.0.0.1 port with a temporary PREFECT_HOME (your runs database is not touched); ``flows.serve`` serves
this project as ``dvc-pipeline/eps-pipeline`` and the toy project of the flow tests
(``tests/toy_dvc_repo.py``) as ``dvc-pipeline/toy``; runs are started through the API as the UI's Run
button does. Pages:

* ``deployments.png``: the Deployments page;
* ``run_form.png``: the project's run form (``stage`` a choice, ``params`` overrides);
* ``cached_run.png``: a run of the project where every stage was up to date (each "Cached");
  ``run_summary.png``: its artifact (stages, headline metrics with their stage, report images);
* ``mixed_run.png``: the toy's ``all`` after a run of stage ``a`` alone: ``a`` Cached, ``b`` and
  ``report`` Completed, in pipeline order; ``cached_stage.png``: its stage ``a``, in state "Cached";
* ``bad_run.png``: a run with a misspelled params key, failed before any stage, the key named.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from flow_overhead import start_server  # noqa: E402
from toy_dvc_repo import make_toy_repo  # noqa: E402

from flows.dvc_stages import subprocess_env  # noqa: E402


def _serve(repo: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo), "--name", name], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_deployment(client, name: str, proc: subprocess.Popen, seconds: float = 240):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.read_deployment_by_name(f"dvc-pipeline/{name}")
        except Exception:  # noqa: BLE001 - not registered yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"flows.serve did not register dvc-pipeline/{name}")
            time.sleep(1)


def shoot(chromium: str, url: str, out: Path, height: int = 1000) -> None:
    """A headless Chromium screenshot of ``url`` once the page's scripts have had 20 s of virtual time."""
    with tempfile.TemporaryDirectory(prefix="chromium_") as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size=1500,{height}", "--virtual-time-budget=20000",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    print(f"{out}: {url}", flush=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "prefect-ui")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect_ui_") as tmp:
        home = Path(tmp) / "prefect"
        home.mkdir()
        server, api = start_server(home)
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(home))
        env = dict(subprocess_env(), PREFECT_API_URL=api, PREFECT_HOME=str(home))
        toy = make_toy_repo(Path(tmp) / "toy")
        served = [_serve(REPO, "eps-pipeline", env), _serve(toy, "toy", env)]
        try:
            _screens(args.out, api.removesuffix("/api"), chromium, served)
        finally:
            _stop(served + [server])
    return 0


def _screens(out: Path, ui: str, chromium: str, served: list[subprocess.Popen]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        project = _wait_for_deployment(client, "eps-pipeline", served[0])
        _wait_for_deployment(client, "toy", served[1])
    cached = run_deployment("dvc-pipeline/eps-pipeline", timeout=900)
    if not cached.state.is_completed():
        raise SystemExit(f"the project run ended {cached.state.name}: is the pipeline fully cached (dvc repro)?")
    bad = run_deployment("dvc-pipeline/eps-pipeline", parameters={"params": {"train_cls.tua": 0.3}}, timeout=300)
    run_deployment("dvc-pipeline/toy", parameters={"stage": "a"}, timeout=300)
    mixed = run_deployment("dvc-pipeline/toy", timeout=300)
    shoot(chromium, f"{ui}/deployments", out / "deployments.png", 700)
    shoot(chromium, f"{ui}/deployments/deployment/{project.id}/run", out / "run_form.png", 1300)
    shoot(chromium, f"{ui}/runs/flow-run/{cached.id}", out / "cached_run.png", 1200)
    with get_client(sync_client=True) as client:
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[cached.id])))[0]
    shoot(chromium, f"{ui}/artifacts/artifact/{summary.id}", out / "run_summary.png", 2400)
    shoot(chromium, f"{ui}/runs/flow-run/{mixed.id}", out / "mixed_run.png")
    with get_client(sync_client=True) as client:
        cached_a = next(t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[mixed.id]))) if t.name == "a")
    shoot(chromium, f"{ui}/runs/task-run/{cached_a.id}", out / "cached_stage.png", 700)
    shoot(chromium, f"{ui}/runs/flow-run/{bad.id}", out / "bad_run.png")


if __name__ == "__main__":
    sys.exit(main())
