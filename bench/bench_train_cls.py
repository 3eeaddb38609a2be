"""Speed, memory and val mAP of the train_cls stage, EPS against the CAM baseline; prints figures.

    python bench/bench_train_cls.py                                    # data/prepared + data/saliency
    python bench/bench_train_cls.py --manifest /tmp/x/dataset.json --saliency-dir /tmp/x/saliency \\
        --set train_cls.iterations=200 --set train_cls.output_stride=8

Each method runs ``python -m tasks.train_cls`` in its own process (so peak memory is its own) on
the repo's params.yaml with the ``--set`` overrides, into ``--out/<method>`` (never the DVC
outputs). Reported per method: seconds per iteration (wall time of the training loop including
data loading, excluding the final evaluation), CPU-seconds per iteration (all threads of the
process), val multi-label mAP of the GAP logits, peak resident memory of the process (ru_maxrss)
and wall time. Both timings depend on the load of the machine (busy cores also make OpenMP
threads spin): compare them only between runs on idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from core.overrides import apply_overrides, parse_assignment
from core.paths import MANIFEST, SALIENCY_DIR

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--manifest", default=str(REPO / MANIFEST))
    ap.add_argument("--saliency-dir", default=str(REPO / SALIENCY_DIR))
    ap.add_argument("--methods", nargs="+", default=["eps", "cam"], choices=("eps", "cam"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="params override, e.g. train_cls.iterations=200 (repeatable)")
    ap.add_argument("--out", default="/tmp/bench_train_cls")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        params = yaml.safe_load(Path(args.params).read_text())
        apply_overrides(params, map(parse_assignment, args.set))
        params["train_cls"]["method"] = method
        run_dir = out / method
        run_dir.mkdir(parents=True, exist_ok=True)
        params_path = run_dir / "params.yaml"
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        cmd = [sys.executable, "-m", "tasks.train_cls", "--params", str(params_path), "--manifest", args.manifest,
               "--saliency-dir", args.saliency_dir, "--out", str(run_dir), "--state-dir", str(run_dir / "state")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{method}: train_cls failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        summary = json.loads((run_dir / "live" / "metrics.json").read_text())
        perf = summary["perf"]
        rows.append((method, perf["sec_per_iter"], perf["cpu_sec_per_iter"], summary["val"]["mAP"],
                     perf["peak_rss_mb"], wall, perf["threads"], perf["device"]))
        print(f"{method}: per-class val AP {summary['val']['AP']}")
    cfg = params["train_cls"]
    print(f"\ntrain_cls bench: backbone {cfg['backbone']} OS{cfg['output_stride']}, crop {cfg['crop_size']}, "
          f"batch {cfg['batch_size']}, {cfg['iterations']} iterations")
    print(f"{'method':<7}{'s/iter':>8}{'CPU-s/iter':>11}{'val mAP':>9}{'peak RSS MiB':>14}{'wall s':>9}"
          f"{'threads':>9}  device")
    for method, spi, cpu, m_ap, rss, wall, threads, device in rows:
        print(f"{method:<7}{spi:>8.3f}{cpu:>11.3f}{m_ap:>9.4f}{rss:>14.0f}{wall:>9.1f}{threads:>9}  {device}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (s/iter is wall time: compare only on idle cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
