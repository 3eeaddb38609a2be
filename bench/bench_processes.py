"""One training process with every core, or one DDP process per core: which trains faster here?

    python bench/bench_processes.py                                  # the three trainers, 1 vs 2 processes
    python bench/bench_processes.py --stages train_cls --iterations 80 --pairs 3

Each trainer stage (``python -m tasks.<stage>``, as ``dvc repro`` starts it) runs ``--iterations``
iterations on this project's data (``dvc repro`` first: train_cls reads the saliency maps, the other
two the pseudo-masks) with ``<stage>.processes`` set to each of ``--processes`` (threads per process:
the stage's default, the cores shared by the processes), into a temporary folder, never touching
``data/``. The settings alternate, ``--pairs`` rounds, so a change in the machine's load hits both.
Printed per stage and setting: the wall time of the command (process start-up included) and the
training seconds per iteration the stage reports (rank 0), medians over the rounds, with the load
average before and after. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train_cls", "train_affinity", "train_seg")


def run_stage(stage: str, params: dict, processes: int, iterations: int, work: Path) -> tuple[float, float]:
    """``(wall seconds, training seconds per iteration)`` of one run of ``stage``."""
    section = dict(params[stage], processes=processes, iterations=iterations,
                   checkpoint_every=iterations, eval_every=0)
    run_dir = work / f"{stage}-{processes}-{time.monotonic_ns()}"
    run_dir.mkdir()
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(dict(params, **{stage: section}), sort_keys=False))
    timings = run_dir / "timings.json"
    cmd = [sys.executable, "-m", f"tasks.{stage}", "--params", str(params_file), "--out", str(run_dir / "out"),
           "--state-dir", str(run_dir / "state"), "--timings", str(timings)]
    if stage == "train_seg":
        cmd += ["--metrics", ""]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, json.loads(timings.read_text())["perf"]["sec_per_iter"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated trainer stages")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts to compare")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=2, help="rounds of the alternating settings")
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    counts = [int(p) for p in args.processes.split(",")]
    stages = [s for s in args.stages.split(",") if s]
    load0 = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load0[0]:.1f} / {load0[1]:.1f} (1 / 5 min) before", flush=True)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
        for stage in stages:
            for rnd in range(args.pairs):
                for n in counts:
                    wall, spi = run_stage(stage, params, n, args.iterations, Path(tmp))
                    results.setdefault((stage, n), []).append((wall, spi))
                    print(f"{stage} processes={n} round {rnd + 1}: {wall:.1f} s wall, {spi:.3f} s/iteration",
                          flush=True)
    load1 = os.getloadavg()
    print(f"\n{args.iterations} iterations per run, medians of {args.pairs} alternating rounds\n")
    print("| stage | processes | wall s | s/iteration | speed-up (s/iteration) |\n|---|---|---|---|---|")
    for stage in stages:
        base = statistics.median(s for _, s in results[(stage, counts[0])])
        for n in counts:
            walls, spis = zip(*results[(stage, n)])
            spi = statistics.median(spis)
            print(f"| {stage} | {n} | {statistics.median(walls):.1f} | {spi:.3f} | {base / spi:.2f}x |")
    print(f"\nload average {load1[0]:.1f} / {load1[1]:.1f} (1 / 5 min) after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
