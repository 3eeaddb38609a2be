"""Where the main job's time goes: wall time of every stage of ``dvc repro``, as it runs.

    python bench/stage_profile.py                 # dvc repro -f of the whole DAG in this project
    python bench/stage_profile.py --no-force      # only what DVC finds stale
    python bench/stage_profile.py --json /tmp/profile.json

Runs DVC in the project (outputs are rewritten with the same bytes: the stages are deterministic),
timestamps each ``Running stage '<name>'`` line DVC prints, and reports per stage the seconds until
the next stage starts (the last one until DVC exits), with each stage's share and the total; the
load average before and after tells whether the cores were idle (a loaded machine lies about speed).
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")


def profile(root: Path, force: bool, targets: list[str]) -> tuple[list[tuple[str, float]], float, int]:
    """``([(stage, seconds)], total seconds, exit status)`` of one ``dvc repro`` in ``root``."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    cmd = [sys.executable, "-m", "dvc", "repro", *(["-f"] if force else []), *targets]
    starts: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = RUNNING.search(line)
            if m:
                starts.append((m.group(1), time.perf_counter()))
                print(f"[{time.perf_counter() - t0:7.1f} s] {m.group(1)}", flush=True)
        code = proc.wait()
    end = time.perf_counter()
    rows = [(name, (starts[i + 1][1] if i + 1 < len(starts) else end) - t) for i, (name, t) in enumerate(starts)]
    return rows, end - t0, code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(REPO), help="DVC project (default: this one)")
    ap.add_argument("--no-force", action="store_true", help="run only the stale stages (dvc repro without -f)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    ap.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole DAG)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load0[0]:.1f} / {load0[1]:.1f} (1 / 5 min) before", flush=True)
    rows, total, code = profile(Path(args.root), not args.no_force, args.targets)
    print("\n| stage | wall s | share |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |")
    print(f"| **total (dvc repro{'' if args.no_force else ' -f'})** | **{total:.1f}** | {total / 60:.1f} min |")
    load1 = os.getloadavg()
    print(f"load average {load1[0]:.1f} / {load1[1]:.1f} after; dvc exit status {code}")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": dict(rows), "total_s": round(total, 1), "exit_status": code,
                                               "load_before": load0[0], "load_after": load1[0]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
