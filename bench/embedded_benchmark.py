"""The embedded benchmark: every variant the README reports, one results file, the README tables from it.

    python bench/embedded_benchmark.py                 # run every variant, write results/embedded_benchmark.json
                                                       # and the README tables
    python bench/embedded_benchmark.py --only eps,cam  # rerun some variants, keep the others' rows
    python bench/embedded_benchmark.py --readme-only   # regenerate the README tables from the results file

Each variant is a scratch copy of the project run by ``bench/compare_variants.py`` (the outputs of the
committed ``dvc.lock`` are checked out from the shared cache, so a variant reruns only the stages its
overrides change: one that differs only in ``export_masks`` trains nothing). Baselines are reported at
their best: every row carries, beside the mIoU of its own rule, the oracle-threshold mIoU (the constant
background threshold that is best against the ground truth -- an oracle, labelled as such, never used by
the pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_variants import REPO, apply_variant, collect, drop_stale, fmt, make_copy, repro_targets  # noqa: E402

from core.overrides import parse_assignments  # noqa: E402

RESULTS = REPO / "results" / "embedded_benchmark.json"
README = REPO / "README.md"
START, END = "<!-- embedded-benchmark:start -->", "<!-- embedded-benchmark:end -->"

# the saliency oracle's maps, written into the variant's copy from its ground truth (bench/upper_bounds.py)
GT_SALIENCY = "gt_saliency"

# the earlier defaults (until the relative selection, the L_sal weight and the joint background): rows measured
# with them keep them explicitly, so that each row's command reproduces it
EARLIER = "train_cls.map_selection=adaptive,train_cls.sal_weight=1"
# the background 1 - saliency (the default until the 0.20 floor under it): rows measured with it keep it explicitly
SAL_BG = "export_masks.background=saliency"
# the segmenter trained on every pseudo-mask pixel (the recipe until the sure regions): rows whose segmenter was
# measured with it keep it explicitly
SEG_ALL = "train_seg.conf_fg_margin=0,train_seg.conf_bg_margin=0"
# the segmenter's val predictions without DeepLab's dense CRF (the default until it was measured): rows whose
# segmenter was evaluated so keep it explicitly
SEG_NO_CRF = "predict_seg.crf=false"
# the masks made from the detector's maps as they are (the default until rescue_saliency): rows measured before
# the rescue keep it explicitly (with it off the stage copies the maps byte for byte, so their inputs are unchanged)
NO_RESCUE = "rescue_saliency.enabled=false"
# IS-Net as the detector (the default until U²-Net-p): rows measured with it keep it explicitly
ISNET = "saliency.backend=isnet"
# the rescue's crops at the whole images' detector input (512 px here; the default until rescue_saliency.input_size:
# auto ran them at the saliency rule for the crops' own size): rows measured with the rescue before keep it explicitly
RESCUE_512 = "rescue_saliency.input_size=512"

# name, overrides (section.key=value), target stage, what the row is
VARIANTS: tuple[tuple[str, str, str, str], ...] = (
    ("cam", f"train_cls.method=cam,export_masks.background=threshold,{SEG_ALL},{SEG_NO_CRF},{NO_RESCUE},{ISNET}",
     "evaluate_seg",
     "CAM, constant background 0.20 (authors' rule)"),
    ("cam_saliency", f"train_cls.method=cam,{SAL_BG},{ISNET},{RESCUE_512}", "evaluate",
     "CAM, background 1 - saliency (missed objects rescued)"),
    ("cam_floor", f"train_cls.method=cam,{ISNET},{RESCUE_512}", "evaluate",
     "CAM, EPS's rule: background max(1 - saliency, 0.20), missed objects rescued"),
    ("eps", "", "evaluate_seg", "EPS, defaults (U²-Net-p saliency, relative selection, L_sal weight 5, background "
                                "max(1 - saliency, 0.20), missed objects rescued)"),
    ("eps_rescue512", RESCUE_512, "evaluate_seg",
     "EPS, defaults but the rescue's crops at the whole images' 512 px (the default before input_size: auto)"),
    ("eps_isnet", f"{ISNET},{RESCUE_512}", "evaluate_seg",
     "EPS, defaults but IS-Net as the detector (the default before U²-Net-p)"),
    ("eps_saliency", f"{SAL_BG},{ISNET},{RESCUE_512}", "evaluate_seg",
     "EPS, defaults but background 1 - saliency (the default before the floor)"),
    ("eps_crf_floor", f"export_masks.crf=true,{ISNET},{RESCUE_512}", "evaluate", "EPS, defaults + dense CRF on the masks"),
    ("eps_no_rescue", f"{SAL_BG},{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS, defaults but the detector's maps as they are (no rescue)"),
    ("eps_seg_no_crf", f"{SAL_BG},{SEG_NO_CRF},{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS, defaults, the segmenter's val predictions without the dense CRF"),
    ("eps_seg_every_pixel", f"{SAL_BG},{SEG_ALL},{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS, defaults, the segmenter trained on every pseudo-mask pixel (the earlier recipe)"),
    ("eps_seg_wide_margins", f"{SAL_BG},train_seg.conf_fg_margin=0.2,train_seg.conf_bg_margin=0.3,{NO_RESCUE},{ISNET}",
     "evaluate_seg",
     "EPS, defaults, the segmenter ignoring more: margins 0.20 / 0.30"),
    ("eps_joint", f"export_masks.background=joint,{SEG_ALL},{SEG_NO_CRF},{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS, defaults but the joint background (saliency and the model's map)"),
    ("eps_bgmap", f"export_masks.background=bgmap,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS, defaults but the model's background map"),
    ("eps_w1", f"{SAL_BG},train_cls.sal_weight=1,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS, defaults but L_sal weight 1 (paper): the relative selection alone"),
    ("eps_adaptive_w5", f"{SAL_BG},train_cls.map_selection=adaptive,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS, defaults but the paper's adaptive selection: the L_sal weight alone"),
    ("eps_w10_joint", f"train_cls.sal_weight=10,export_masks.background=joint,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS, L_sal weight 10 and the joint background"),
    ("eps_adaptive", f"{EARLIER},{SAL_BG},{SEG_ALL},{SEG_NO_CRF},{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS, the earlier defaults (paper's adaptive selection, L_sal weight 1, background 1 - saliency)"),
    ("eps_naive", f"train_cls.map_selection=naive,train_cls.sal_weight=1,{SAL_BG},{NO_RESCUE},{ISNET}", "evaluate",
     "EPS, naive selection (every present class foreground; weight 1, background 1 - saliency)"),
    ("eps_threshold", f"{EARLIER},export_masks.background=threshold,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS (earlier defaults), constant background 0.20"),
    ("eps_adaptive_bgmap", f"{EARLIER},export_masks.background=bgmap,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS (earlier defaults), the model's background map"),
    ("eps_crf", f"{EARLIER},{SAL_BG},export_masks.crf=true,{SEG_ALL},{SEG_NO_CRF},{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS (earlier defaults) + dense CRF"),
    ("eps_refined_seg", f"{SAL_BG},train_seg.mask_source=refined,{NO_RESCUE},{ISNET}", "evaluate_seg",
     "EPS, defaults, the segmenter trained on the AffinityNet-refined masks"),
    ("eps_crf_now", f"{SAL_BG},export_masks.crf=true,{ISNET},{RESCUE_512}", "evaluate_seg",
     "EPS, defaults + dense CRF on the masks (and the segmenter trained on them)"),
    ("eps_affinity_psa", f"{SAL_BG},refine_masks.background=psa,{NO_RESCUE},{ISNET}", "evaluate_refined",
     "EPS, defaults, AffinityNet with psa's walk ([(1 - max CAM)^16, CAMs] walked at the grid)"),
    ("eps_affinity_300", f"{SAL_BG},train_affinity.iterations=300,{NO_RESCUE},{ISNET}", "evaluate_refined",
     "EPS, defaults, AffinityNet trained 300 iterations (4 epochs, the earlier default)"),
    ("cam_crf", f"train_cls.method=cam,export_masks.background=threshold,export_masks.crf=true,{NO_RESCUE},{ISNET}",
     "evaluate",
     "CAM, constant background 0.20 + dense CRF"),
    ("cam_affinity",
     f"train_cls.method=cam,export_masks.background=threshold,refine_masks.background=psa,{NO_RESCUE},{ISNET}",
     "evaluate_refined", "CAM, constant background 0.20, AffinityNet as psa (sure regions at 0.30 / 0.05)"),
    ("gt_seg", f"{SAL_BG},train_seg.mask_source=ground_truth,{ISNET},{RESCUE_512}", "evaluate_seg",
     "ground-truth masks (upper bound)"),
    ("gt_seg_no_crf", f"{SAL_BG},train_seg.mask_source=ground_truth,{SEG_NO_CRF},{ISNET},{RESCUE_512}", "evaluate_seg",
     "ground-truth masks (upper bound), predictions without the dense CRF"),
    ("eps_loss_stride4", f"{EARLIER},{SAL_BG},train_cls.loss_stride=4,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS (earlier defaults), L_sal on maps upsampled to crop/4"),
    ("eps_warmup", f"{EARLIER},{SAL_BG},train_cls.selection_warmup=100,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS (earlier defaults), naive selection for the first 100 iterations"),
    ("eps_authors", f"{EARLIER},train_cls.empty_maps=background,train_cls.saliency_resize=nearest,"
                    f"export_masks.background=threshold,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS, the authors' rules (adaptive selection, weight 1, empty maps to the background, nearest saliency, 0.20)"),
    ("eps_empty_background", f"{EARLIER},{SAL_BG},train_cls.empty_maps=background,{NO_RESCUE},{ISNET}", "evaluate",
     "EPS (earlier defaults), a class with no confident pixel goes to the background (the authors' rule, alone)"),
    ("eps_saliency_oracle", f"{EARLIER},{SAL_BG},{SEG_ALL},{SEG_NO_CRF},saliency.backend=precomputed,"
                            f"saliency.precomputed_dir={GT_SALIENCY},{NO_RESCUE}",
     "evaluate_seg", "EPS (earlier defaults) with the ground-truth foreground as saliency (an oracle: training and export)"),
)


# rows about what follows the pseudo-masks (their raw masks are another row's): left out of the pseudo-mask table
NOT_PSEUDO_ROWS = ("gt_seg", "gt_seg_no_crf", "eps_seg_no_crf", "eps_refined_seg", "eps_seg_every_pixel",
                   "eps_seg_wide_margins", "eps_affinity_psa", "eps_affinity_300", "cam_affinity")


def earlier_rule(name: str, r: dict) -> bool:
    """Whether a row's masks used the background 1 - saliency (pinned: the default before the 0.20 floor) and
    neither its label nor the earlier defaults it names already say so."""
    overrides = r.get("overrides", "")
    return SAL_BG in overrides and EARLIER not in overrides and "saliency" not in r.get("label", "")


def label_marks(name: str, r: dict) -> list[str]:
    """What a row's label leaves out about its masks: IS-Net as the detector, the earlier background rule, no
    rescue, the rescue's crops at the whole images' input."""
    overrides = r.get("overrides", "")
    blind = "train_cls.method=cam" in overrides and "export_masks.background=threshold" in overrides  # no saliency
    isnet = ISNET in overrides and "IS-Net" not in r.get("label", "") and not blind
    crops_512 = RESCUE_512 in overrides and name != "eps_rescue512" and not blind
    return [m for m, on in (("IS-Net", isnet), ("background 1 - saliency", earlier_rule(name, r)),
                            ("no rescue", unrescued(name, r)), ("rescue crops at 512", crops_512)) if on]


def in_parens(marks: list[str]) -> str:
    """`` (a, b)`` after a label, or nothing when there are no marks."""
    return f" ({', '.join(marks)})" if marks else ""


def unrescued(name: str, r: dict) -> bool:
    """Whether a row's masks came from the detector's maps without the rescue (where it would have mattered: a
    saliency background rule) and its label does not already say so."""
    overrides = r.get("overrides", "")
    background = re.search(r"export_masks\.background=(\w+)", overrides)
    return (NO_RESCUE in overrides and name != "eps_no_rescue"
            and (background is None or background.group(1) not in ("threshold", "bgmap")))


def run_variant(name: str, spec: str, target: str, out: Path, dvc: str) -> dict:
    run = out / name
    make_copy(run)
    params = apply_variant(yaml.safe_load((run / "params.yaml").read_text()), parse_assignments(spec), name)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run / "repro.log"
    print(f"[{name}] dvc repro {target} (and evaluate) in {run} (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        if GT_SALIENCY in spec:   # the oracle's maps come from the prepared ground truth
            for cmd in ([dvc, "repro", "prepare"],
                        [sys.executable, "bench/upper_bounds.py", "--write-gt-saliency", GT_SALIENCY]):
                if subprocess.run(cmd, cwd=run, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    raise SystemExit(f"[{name}] {' '.join(cmd[:3])} failed; see {log}")
        proc = subprocess.run([dvc, "repro", *repro_targets(target)], cwd=run, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] dvc repro failed (exit {proc.returncode}); see {log}")
    row = drop_stale(collect(run), target)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"[{name}] done in {row['wall_s']:.0f} s: pseudo mIoU {fmt(row['pseudo_miou'])}", flush=True)
    return row


def tables(results: dict) -> str:
    """The README's markdown tables, from the results file alone."""
    rows = results["variants"]
    pair_names = sorted(next((r["pairs"] for r in rows.values() if r.get("pairs")), {}))
    lines = ["Pseudo-masks of the embedded training images. *Oracle threshold*: the constant background "
             "threshold that is best against the ground truth (an oracle, never used by the pipeline), with the "
             "mIoU and mean m_kc it gives. m_kc = FP_kc / TP_c, context pixels taken for the class per true "
             "class pixel (lower is better).", "",
             "| masks | mIoU | oracle threshold: mIoU (m_kc) | boundary F1 | mean m_kc | "
             + " | ".join(pair_names) + " |", "|" + "---|" * (5 + len(pair_names))]
    for name, r in rows.items():
        if r.get("pseudo_miou") is None or name in NOT_PSEUDO_ROWS:
            continue
        oracle = "-"
        if r.get("oracle_miou") is not None:
            oracle = f"{fmt(r['oracle_miou'])} @ {r['oracle_threshold']:g}"
            if r.get("oracle_mkc") is not None:
                oracle += f" ({fmt(r['oracle_mkc'], 2)})"
        label = r["label"] + in_parens(label_marks(name, r))
        lines.append(f"| {label} | {fmt(r['pseudo_miou'])} | {oracle} | {fmt(r['boundary_f1'])} "
                     f"| {fmt(r['confusion'], 2)} | " + " | ".join(fmt(r["pairs"].get(p), 2) for p in pair_names)
                     + " |")
    cam = rows.get("cam", {})
    if cam.get("oracle_pairs"):
        lines.append(f"| CAM at its oracle threshold {cam['oracle_threshold']:g} (the bar) | {fmt(cam['oracle_miou'])} "
                     f"| - | - | {fmt(cam.get('oracle_mkc'), 2)} | "
                     + " | ".join(fmt(cam["oracle_pairs"].get(p), 2) for p in pair_names) + " |")
    lines += ["", *table4(rows)]
    lines += ["", "Segmenters trained on the sure regions of their masks (`train_seg.conf_*_margin`, the default) unless "
              "marked *every pixel* (the earlier recipe, the rows' overrides restore it); refined and ground-truth "
              "masks train on every pixel. Val predictions are refined with DeepLab's dense CRF (`predict_seg.crf`, "
              "the default and the paper's segmenter) unless marked *no test-time CRF* (the earlier default).", "",
              "| segmenter (DeepLab-v2) trained on | val mIoU | training s |", "|---|---|---|"]
    for name, r in rows.items():
        if r.get("seg_miou") is not None:
            overrides = r.get("overrides", "")
            marks = [m for m, on in (("every pixel", SEG_ALL in overrides and name != "eps_seg_every_pixel"),
                                     ("no test-time CRF", SEG_NO_CRF in overrides and not name.endswith("_no_crf")))
                     if on] + label_marks(name, r)
            lines.append(f"| {r['label']}{in_parens(marks)} | {fmt(r['seg_miou'])} | {fmt(r.get('seg_train_s'), 0)} |")
    lines += ["", "| classifier | val mAP | s/iter | peak MiB |", "|---|---|---|---|"]
    for name in ("cam", "eps"):
        r = rows.get(name)
        if r and r.get("val_mAP") is not None:
            lines.append(f"| {name.upper()} | {fmt(r['val_mAP'])} | {fmt(r['s_per_iter'], 2)} "
                         f"| {fmt(r['peak_rss_mb'], 0)} |")
    lines += ["", f"Made by `{results['command']}` ({results['machine']}); every row's command is in "
              "`results/embedded_benchmark.json`. Training times, s/iter and memory are those of the run that trained "
              "the model (wall time, other work on the machine; a stage that DVC restored from its cache keeps "
              "no timings)."]
    return "\n".join(lines)


def table4(rows: dict) -> list[str]:
    """The paper's Table 4 on the embedded set: pseudo-mask mIoU raw, with dense CRF, with AffinityNet."""
    def cell(name: str, key: str) -> str:
        return fmt(rows.get(name, {}).get(key))

    eps_aff = rows.get("eps", {}).get("refined_miou")
    lines = ["Refinement (the paper's Table 4: 69.4 raw, 71.4 CRF, 71.6 AffinityNet on VOC). Pseudo-mask mIoU; "
             "AffinityNet is `train_affinity` + `refine_masks` (`refine_masks.background: export` for EPS, the "
             "default; `psa` for CAM, psa's own rule), with its boundary F1 and mean m_kc.", "",
             "| masks | raw | + dense CRF | + AffinityNet | AffinityNet boundary F1 | AffinityNet mean m_kc | "
             "AffinityNet train s (s/iter) | refine img/s |", "|---|---|---|---|---|---|---|---|"]
    for label, raw, crf, aff in (("CAM, constant background 0.20", "cam", "cam_crf", "cam_affinity"),
                                 ("EPS, defaults", "eps", "", "eps"),
                                 ("EPS, defaults but IS-Net", "eps_isnet", "eps_crf_floor", "eps_isnet"),
                                 ("EPS, IS-Net, background 1 - saliency", "eps_saliency", "eps_crf_now",
                                  "eps_saliency"),
                                 ("EPS, IS-Net, background 1 - saliency, no rescue", "eps_no_rescue", "",
                                  "eps_no_rescue")):
        r = rows.get(aff, {})
        if raw not in rows:
            continue
        timing = "-"
        if r.get("affinity_train_s") is not None:
            timing = f"{fmt(r['affinity_train_s'], 0)} ({fmt(r.get('affinity_s_per_iter'), 2)})"
        raw_miou = r.get("pseudo_miou", rows[raw].get("pseudo_miou"))   # the masks the refinement started from
        lines.append(f"| {label} | {fmt(raw_miou)} | {cell(crf, 'pseudo_miou')} | {fmt(r.get('refined_miou'))} "
                     f"| {fmt(r.get('refined_boundary_f1'))} | {fmt(r.get('refined_confusion'), 2)} | {timing} "
                     f"| {fmt(r.get('refine_img_s'), 1)} |")
    for name, label in (("eps_affinity_psa", "EPS, defaults, AffinityNet with psa's walk rule"),
                        ("eps_affinity_300", "EPS, defaults, AffinityNet trained 300 iterations (the earlier default)")):
        r = rows.get(name, {})
        if eps_aff is None or r.get("refined_miou") is None:
            continue
        timing = "-"
        if r.get("affinity_train_s") is not None:
            timing = f"{fmt(r['affinity_train_s'], 0)} ({fmt(r.get('affinity_s_per_iter'), 2)})"
        label += in_parens(label_marks(name, r))
        lines.append(f"| {label} | {fmt(r.get('pseudo_miou'))} | - | {fmt(r['refined_miou'])} "
                     f"| {fmt(r.get('refined_boundary_f1'))} | {fmt(r.get('refined_confusion'), 2)} | {timing} "
                     f"| {fmt(r.get('refine_img_s'), 1)} |")
    return lines


def write_readme(results: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{tables(results)}\n{END}", text,
                 flags=re.S)
    README.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated variant names to (re)run; the others keep their rows")
    ap.add_argument("--out", default="/tmp/embedded_benchmark", help="scratch copies, one per variant")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate the README tables")
    args = ap.parse_args(argv)
    known = {v[0]: v for v in VARIANTS}
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"variants": {}}
    if not args.readme_only:
        names = [n for n in args.only.split(",") if n] or list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(known)}")
        dvc = str(Path(shutil.which("dvc") or Path(sys.executable).parent / "dvc").resolve())
        for name in names:
            _, spec, target, label = known[name]
            row = run_variant(name, spec, target, Path(args.out), dvc)
            cmd = (f"python bench/compare_variants.py --target {target} --variant {name}"
                   + (f":{spec}" if spec else ""))
            results["variants"][name] = {"label": label, "overrides": spec, "command": cmd, **row}
            results["variants"] = {n: results["variants"][n] for n in known if n in results["variants"]}
            results["command"] = "python bench/embedded_benchmark.py"
            results["machine"] = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # after each variant: a kill keeps the rest
            print(f"wrote {RESULTS}")
    write_readme(results)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
