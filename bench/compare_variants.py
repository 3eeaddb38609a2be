"""Run the DVC pipeline for several params variants and print one table of their metrics.

    python bench/compare_variants.py                        # the default set: EPS vs CAM, +/- CRF,
                                                            # segmenters on EPS / CAM / GT masks
    python bench/compare_variants.py --variant eps \\
        --variant cam:train_cls.method=cam --variant os8:train_cls.output_stride=8 --target evaluate
    python bench/compare_variants.py --from /tmp/compare_variants/eps --target evaluate \\
        --out /tmp/cv2 --variant cls1000:train_cls.iterations=1000   # eps's saliency is not run again

This is how the closing-note tables are made. Each variant is a scratch copy of the project in
``--out/<name>`` (the files git tracks plus ``dvc.lock``) that uses this project's DVC cache, with the
``section.key=value`` overrides written into its ``params.yaml``; ``dvc repro <target>`` then runs
in it. The outputs the lock records are checked out from the cache where it holds them, so the stages
whose deps and params a variant keeps do not run again: variants that differ only in ``export_masks``
train nothing (DVC's run cache cannot restore a stage whose metrics git tracks).
``--from RUN`` starts every variant from a finished run's folder instead (``--out/<name>`` of an earlier
call): its outputs and ``dvc.lock`` come along, so DVC reruns only the stages whose code, deps or params
differ from what RUN ran (on a CPU, the saliency of a variant that changes only a trainer is not computed
again). The params are still this project's ``params.yaml`` with the variant's overrides, and the code this
checkout's. Variants run one after another (each stage uses every core). Reported per variant, where its stages
ran: classifier val mAP, s/iter and peak memory; pseudo-mask mIoU, boundary F1 and the mean
co-occurrence confusion ratio (with each pair's); CAM inference and export throughput; segmentation
val mIoU and training time; the variant's wall time (restored stages cost almost nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.config import ConfigError  # noqa: E402
from core.overrides import apply_overrides, parse_assignments  # noqa: E402
from core.paths import (  # noqa: E402
    EVAL_PSEUDO_METRICS,
    EVAL_REFINED_METRICS,
    EVAL_SEG_METRICS,
    MODELS_STATE,
    TRAIN_CLS_METRICS,
)

DEFAULT_VARIANTS = (
    "eps",
    "eps_crf:export_masks.crf=true",
    "cam:train_cls.method=cam",
    "cam_crf:train_cls.method=cam,export_masks.crf=true",
    "gt_seg:train_seg.mask_source=ground_truth",
)


def parse_variant(spec: str) -> tuple[str, list[tuple[list[str], object]]]:
    """``name:sec.key=value,sec.key=value`` -> (name, [(path, value), ...])."""
    name, _, rest = spec.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--variant {spec!r}: the name must be letters, digits, '_' or '-'")
    try:
        return name, parse_assignments(rest)
    except ConfigError as e:
        raise SystemExit(f"--variant {spec!r}: {e}") from None


def apply_variant(params: dict, sets: list[tuple[list[str], object]], name: str) -> dict:
    """The params of variant ``name``; exits naming the variant and the key when a key does not exist."""
    try:
        return apply_overrides(params, sets)
    except ConfigError as e:
        raise SystemExit(f"variant {name}: {e}") from None


def check_base(base: Path, dests: list[Path]) -> None:
    """``--from``: a finished run's folder, and none of the folders the variants are about to replace."""
    if not (base / "dvc.yaml").is_file() or not (base / "dvc.lock").is_file():
        raise SystemExit(f"--from {base}: not a finished run's folder (no dvc.yaml and dvc.lock there); give a "
                         "folder an earlier call made (--out/<name>)")
    if any(base.resolve() == d.resolve() for d in dests):
        raise SystemExit(f"--from {base}: a variant of this call would write over it; name the variant otherwise "
                         "or pass another --out")


def make_copy(dest: Path, base: Path | None = None) -> None:
    """The tracked files and dvc.lock of this project in ``dest``, using this project's DVC cache; with
    ``base`` (a finished run's folder), that folder's outputs and dvc.lock under this project's files."""
    if dest.exists():
        shutil.rmtree(dest)
    if base is not None:
        shutil.copytree(base, dest, symlinks=True, ignore=shutil.ignore_patterns("repro.log"))
        # timings are written only where a stage runs: the base's would pass for the variant's
        shutil.rmtree(dest / "data" / "timings", ignore_errors=True)
        shutil.rmtree(dest / ".dvc" / "tmp", ignore_errors=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    files = {f for f in tracked.decode().split("\0") if f}
    if base is None:
        files.add("dvc.lock")   # the lock, committed or not
    else:
        # the base's lock and outputs (the metrics git tracks under data/ among them) describe each other
        files = {f for f in files if f != "dvc.lock" and not f.startswith("data/")}
    files = sorted(files)
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    cache = REPO / ".dvc" / "cache"
    (dest / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")
    # fetched models (`make assets`, never in git): linked file by file, so that the copy's own lock
    # files and downloads stay in the copy and the source checkout is only read
    if (REPO / MODELS_STATE).is_dir():
        (dest / MODELS_STATE).mkdir(parents=True, exist_ok=True)
        for model in (REPO / MODELS_STATE).iterdir():
            link = dest / MODELS_STATE / model.name
            if model.is_file() and not model.name.startswith(".") and not link.is_symlink():
                os.symlink(model, link)
    # the outputs dvc.lock records, from the shared cache: stages whose deps and params the variant keeps
    # are then up to date (the run cache cannot restore them: their metrics are git-tracked, cache: false)
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet"], cwd=dest, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(run: Path) -> dict:
    cls = read_json(run / TRAIN_CLS_METRICS)
    # timings (core.timings) exist only where the stage ran in this copy, not where DVC restored it
    cls_perf = read_json(run / "data/timings/train_cls.json").get("perf", {})
    pseudo = read_json(run / EVAL_PSEUDO_METRICS)
    seg = read_json(run / EVAL_SEG_METRICS)
    refined = read_json(run / EVAL_REFINED_METRICS)
    aff_perf = read_json(run / "data/timings/train_affinity.json").get("perf", {})
    return {
        "val_mAP": cls.get("val", {}).get("mAP"),
        "s_per_iter": cls_perf.get("sec_per_iter"),
        "peak_rss_mb": cls_perf.get("peak_rss_mb"),
        "pseudo_miou": pseudo.get("miou"),
        "boundary_f1": pseudo.get("boundary", {}).get("f1"),
        "confusion": pseudo.get("cooccurrence", {}).get("mean_ratio"),
        "pairs": {k: v["ratio"] for k, v in pseudo.get("cooccurrence", {}).get("pairs", {}).items()},
        "context_share": {k: v.get("context_share") for k, v in pseudo.get("cooccurrence", {}).get("pairs", {}).items()},
        "per_class_iou": pseudo.get("per_class_iou"),
        # the best constant background threshold, picked with the ground truth: an oracle, never a default
        "oracle_threshold": pseudo.get("threshold_sweep", {}).get("oracle_threshold"),
        "oracle_miou": pseudo.get("threshold_sweep", {}).get("oracle_miou"),
        "oracle_mkc": pseudo.get("threshold_sweep", {}).get("oracle_mean_mkc"),
        "oracle_pairs": pseudo.get("threshold_sweep", {}).get("oracle_pairs"),
        "infer_img_s": read_json(run / "data/timings/infer_cam.json").get("timing", {}).get("images_per_s"),
        "export_img_s": read_json(run / "data/timings/export_masks.json").get("timing", {}).get("images_per_s"),
        "seg_miou": seg.get("miou"),
        "seg_per_class_iou": seg.get("per_class_iou"),
        "seg_train_s": read_json(run / "data/timings/train_seg.json").get("perf", {}).get("train_seconds"),
        # the AffinityNet refinement (train_affinity, refine_masks, evaluate_refined)
        "refined_miou": refined.get("miou"),
        "refined_boundary_f1": refined.get("boundary", {}).get("f1"),
        "refined_confusion": refined.get("cooccurrence", {}).get("mean_ratio"),
        "refined_pairs": {k: v["ratio"] for k, v in refined.get("cooccurrence", {}).get("pairs", {}).items()},
        "refined_per_class_iou": refined.get("per_class_iou"),
        "affinity_train_s": aff_perf.get("train_seconds"),
        "affinity_s_per_iter": aff_perf.get("sec_per_iter"),
        "affinity_peak_rss_mb": aff_perf.get("peak_rss_mb"),
        "refine_img_s": read_json(run / "data/timings/refine_masks.json").get("timing", {}).get("images_per_s"),
    }


def repro_targets(target: str) -> list[str]:
    """The stages a variant reproduces for ``target``: ``evaluate`` too, so every row has its pseudo-mask
    figures, and ``evaluate_refined`` with ``evaluate_seg``, since train_seg reads the refined masks."""
    if target == "evaluate":
        return [target]
    return ["evaluate", "evaluate_refined", target] if target == "evaluate_seg" else ["evaluate", target]


def drop_stale(row: dict, target: str) -> dict:
    """``row`` without the figures its copy holds from the committed run rather than from this variant: the
    segmenter's unless ``target`` is evaluate_seg, AffinityNet's unless it is evaluate_seg or evaluate_refined."""
    row = dict(row)
    if target != "evaluate_seg":
        row.update(seg_miou=None, seg_per_class_iou=None, seg_train_s=None)
    if target not in ("evaluate_seg", "evaluate_refined"):
        row.update({k: None for k in row if k.startswith(("refined_", "affinity_", "refine_"))})
    return row


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def oracle_cell(r: dict) -> str:
    """``0.315 @ 0.8``: the threshold sweep's best mIoU and threshold (uses the ground truth)."""
    if r.get("oracle_miou") is None:
        return "-"
    return f"{fmt(r['oracle_miou'])} @ {r['oracle_threshold']:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", metavar="NAME[:SEC.KEY=VALUE,...]",
                    help=f"repeatable; default: {' '.join(DEFAULT_VARIANTS)}")
    ap.add_argument("--target", default="evaluate_seg", help="the DVC stage to reproduce (and what it needs)")
    ap.add_argument("--out", default="/tmp/compare_variants")
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    ap.add_argument("--from", dest="base", default="", metavar="RUN",
                    help="start each variant from this finished run's folder (its outputs and dvc.lock)")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("variant names must be distinct")
    out = Path(args.out)
    base = Path(args.base) if args.base else None
    if base is not None:
        check_base(base, [out / n for n, _ in variants])
    if not (REPO / ".dvc" / "cache").is_dir():
        print("note: this project's DVC cache is empty (no `dvc repro` here yet): every variant runs every stage",
              flush=True)
    # absolute: the command runs inside each copy, where a relative PATH entry would not resolve
    dvc = str(Path(shutil.which("dvc") or Path(sys.executable).parent / "dvc").resolve())
    rows = {}
    for name, sets in variants:
        run = out / name
        make_copy(run, base)
        params = apply_variant(yaml.safe_load((run / "params.yaml").read_text()), sets, name)
        (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        log = run / "repro.log"
        print(f"[{name}] dvc repro {' '.join(repro_targets(args.target))} in {run} (log: {log})", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([dvc, "repro", *repro_targets(args.target)], cwd=run, stdout=f, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, DVC_NO_ANALYTICS="1"))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"[{name}] dvc repro failed (exit {proc.returncode}); see {log}", file=sys.stderr)
            return proc.returncode
        rows[name] = dict(drop_stale(collect(run), args.target), wall_s=wall)
        print(f"[{name}] done in {wall:.0f} s", flush=True)
    header = ("| variant | val mAP | s/iter | peak MiB | pseudo mIoU | oracle-threshold mIoU | boundary F1 | mean m_kc "
              "| infer img/s "
              "| export img/s | seg mIoU | seg train s | wall s |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, r in rows.items():
        print(f"| {name} | {fmt(r['val_mAP'])} | {fmt(r['s_per_iter'])} | {fmt(r['peak_rss_mb'], 0)} "
              f"| {fmt(r['pseudo_miou'])} | {oracle_cell(r)} | {fmt(r['boundary_f1'])} | {fmt(r['confusion'])} "
              f"| {fmt(r['infer_img_s'], 1)} | {fmt(r['export_img_s'], 1)} | {fmt(r['seg_miou'])} "
              f"| {fmt(r['seg_train_s'], 0)} | {r['wall_s']:.0f} |")
    pairs = sorted({p for r in rows.values() for p in r["pairs"]})
    if pairs:
        print("\nco-occurrence confusion m_{k,c} = FP_{k,c} / TP_c (lower is better)")
        print("| variant | " + " | ".join(pairs) + " |")
        print("|" + "---|" * (len(pairs) + 1))
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(fmt(r["pairs"].get(p)) for p in pairs) + " |")
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings are wall time)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
