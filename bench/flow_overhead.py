"""What the Prefect flow adds to a fully cached pipeline: `dvc repro` against `python -m flows.pipeline`.

    python bench/flow_overhead.py                 # this project, everything cached (run `dvc repro` first)
    python bench/flow_overhead.py --pairs 5 --repo /path/to/dvc/project

A Prefect server is started on a free 127.0.0.1 port with a temporary PREFECT_HOME (your runs database
is not touched) and stopped at the end. Each pair runs `dvc repro` then the flow against that server,
both as a user would start them (new processes, imports included); the medians and the ratio are
printed. The issue's target: the flow at most 2x `dvc repro`. Pairs on a loaded machine lie: run it on
idle cores.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.dvc_stages import subprocess_env  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on a free port; (process, API URL) once it answers."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(subprocess_env(), PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=api)   # the UI's pages call the API here, not at the default port
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                return proc, api
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("prefect server start exited; run it by hand to see why")
            time.sleep(1)
    proc.kill()
    raise SystemExit("the Prefect server did not answer within 180 s")


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if "dvc" in cmd and "Running stage" in done.stdout:
        raise SystemExit("`dvc repro` ran a stage: the pipeline is not fully cached; run `dvc repro` first")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="DVC project (default: this one)")
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flow_overhead_") as home:
        server, api = start_server(Path(home))
        try:
            env = dict(subprocess_env(), PREFECT_API_URL=api, PREFECT_HOME=home)
            dvc, flow = [], []
            for i in range(args.pairs):
                dvc.append(timed([sys.executable, "-m", "dvc", "repro"], args.repo, env))
                flow.append(timed([sys.executable, "-m", "flows.pipeline", "--repo", str(args.repo)], REPO, env))
                print(f"pair {i + 1}: dvc repro {dvc[-1]:.2f} s, flow {flow[-1]:.2f} s", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
    d, f = statistics.median(dvc), statistics.median(flow)
    print(f"median of {args.pairs} pairs: dvc repro {d:.2f} s, flow {f:.2f} s, ratio {f / d:.2f} "
          f"(target <= 2); load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
