"""bench/compare_variants.py: variant parsing, params overrides, the scratch copy and the metrics it reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from core.overrides import parse_assignments

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_variants", REPO / "bench" / "compare_variants.py")
cv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cv)


def test_variant_specs_parse_to_typed_overrides():
    assert cv.parse_variant("eps") == ("eps", [])
    name, sets = cv.parse_variant("cam_crf:train_cls.method=cam,export_masks.crf=true,infer_cam.scales=[1.0]")
    assert name == "cam_crf"
    assert sets == [(["train_cls", "method"], "cam"), (["export_masks", "crf"], True),
                    (["infer_cam", "scales"], [1.0])]


@pytest.mark.parametrize("spec", ["", "a b:x.y=1", "v:noequals", "v:.x=1"])
def test_bad_variant_specs_are_refused(spec):
    with pytest.raises(SystemExit):
        cv.parse_variant(spec)


def test_overrides_must_name_existing_params_keys():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = cv.apply_variant(params, cv.parse_variant("v:train_cls.method=cam")[1], "v")
    assert out["train_cls"]["method"] == "cam"
    with pytest.raises(SystemExit, match="train_cls.metod"):
        cv.apply_variant(params, cv.parse_variant("v:train_cls.metod=cam")[1], "v")
    with pytest.raises(SystemExit, match="no section 'nosuch'"):
        cv.apply_variant(params, cv.parse_variant("v:nosuch.key=1")[1], "v")
    with pytest.raises(SystemExit, match="variant v: params has no key 'nosection'"):
        cv.apply_variant(params, cv.parse_variant("v:nosection=1")[1], "v")
    assert cv.apply_variant(params, cv.parse_variant("s1:seed=1")[1], "s1")["seed"] == 1   # a top-level key


def test_scratch_copy_has_the_tracked_files_and_uses_the_project_cache(tmp_path):
    dest = tmp_path / "copy"
    cv.make_copy(dest)
    for rel in ("dvc.yaml", "params.yaml", "tasks/train_cls.py", "README.md"):
        assert (dest / rel).read_bytes() == (REPO / rel).read_bytes()
    assert str(REPO / ".dvc" / "cache") in (dest / ".dvc" / "config.local").read_text()
    # the outputs dvc.lock records are checked out from the shared cache when it holds them
    prepared = next(o for o in yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
                    if o["path"] == "data/prepared")
    cached = REPO / ".dvc" / "cache" / "files" / "md5" / prepared["md5"][:2] / prepared["md5"][2:]
    assert (dest / "data" / "prepared" / "dataset.json").is_file() == cached.is_file()
    # fetched models are linked file by file: the copy's lock files stay in the copy
    models = dest / ".state" / "models"
    if (REPO / ".state" / "models").is_dir():
        assert models.is_dir() and not models.is_symlink()
        assert all(m.is_symlink() for m in models.iterdir())


def test_metrics_are_collected_from_the_stage_outputs(tmp_path):
    def put(rel, obj):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(obj))

    put("data/train_cls/live/metrics.json", {"val": {"mAP": 0.9}})
    put("data/timings/train_cls.json", {"perf": {"sec_per_iter": 0.5, "peak_rss_mb": 100}})
    put("data/metrics/eval_pseudo.json", {"miou": 0.3, "boundary": {"f1": 0.2},
                                          "cooccurrence": {"mean_ratio": 1.5, "pairs": {"rail->train": {"ratio": 1.5}}},
                                          "threshold_sweep": {"oracle_threshold": 0.8, "oracle_miou": 0.35},
                                          })
    put("data/timings/infer_cam.json", {"timing": {"images_per_s": 5.0}})
    put("data/timings/export_masks.json", {"timing": {"images_per_s": 20.0}})
    row = cv.collect(tmp_path)
    assert row["val_mAP"] == 0.9 and row["pseudo_miou"] == 0.3 and row["confusion"] == 1.5
    assert row["s_per_iter"] == 0.5 and row["infer_img_s"] == 5.0 and row["export_img_s"] == 20.0
    assert (row["oracle_miou"], row["oracle_threshold"]) == (0.35, 0.8)
    assert cv.oracle_cell(row) == "0.350 @ 0.8" and cv.oracle_cell({"oracle_miou": None}) == "-"
    assert row["pairs"] == {"rail->train": 1.5}
    assert row["seg_miou"] is None and row["seg_train_s"] is None  # the segmenter did not run


def test_a_row_keeps_only_the_figures_its_target_reproduced():
    # a copy holds the committed run's eval_seg.json and eval_refined.json: a variant that did not
    # reproduce those stages must not report them as its own
    assert cv.repro_targets("evaluate") == ["evaluate"]
    assert cv.repro_targets("evaluate_refined") == ["evaluate", "evaluate_refined"]
    assert cv.repro_targets("evaluate_seg") == ["evaluate", "evaluate_refined", "evaluate_seg"]
    row = {"pseudo_miou": 0.6, "seg_miou": 0.7, "seg_per_class_iou": {}, "seg_train_s": 9.0,
           "refined_miou": 0.65, "affinity_train_s": 3.0, "refine_img_s": 4.0}
    assert cv.drop_stale(row, "evaluate_seg") == row
    assert cv.drop_stale(row, "evaluate_refined") == dict(row, seg_miou=None, seg_per_class_iou=None,
                                                          seg_train_s=None)
    assert cv.drop_stale(row, "evaluate") == {"pseudo_miou": 0.6, "seg_miou": None, "seg_per_class_iou": None,
                                              "seg_train_s": None, "refined_miou": None,
                                              "affinity_train_s": None, "refine_img_s": None}
    assert row["seg_miou"] == 0.7          # the caller's row is left as it was


def _embedded_benchmark():
    spec = importlib.util.spec_from_file_location("embedded_benchmark", REPO / "bench" / "embedded_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_embedded_benchmark_variants_name_existing_keys_and_tables_come_from_the_results():
    eb = _embedded_benchmark()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, spec, target, _ in eb.VARIANTS:
        cv.apply_variant(yaml.safe_load(yaml.safe_dump(params)), parse_assignments(spec), name)  # exits on a bad key
        assert target in ("evaluate", "evaluate_refined", "evaluate_seg")
    row = {"label": "EPS", "pseudo_miou": 0.5, "oracle_miou": 0.4, "oracle_threshold": 0.6, "boundary_f1": 0.3,
           "confusion": 1.25, "pairs": {"rail->train": 1.25}, "seg_miou": 0.45, "seg_train_s": 300.0,
           "val_mAP": 0.99, "s_per_iter": 0.5, "peak_rss_mb": 1200.0}
    text = eb.tables({"variants": {"eps": row}, "command": "python bench/embedded_benchmark.py", "machine": "2 CPUs"})
    assert "| EPS | 0.500 | 0.400 @ 0.6 | 0.300 | 1.25 | 1.25 |" in text
    assert "| EPS | 0.450 | 300 |" in text and "| EPS | 0.990 | 0.50 | 1200 |" in text
    # the Table 4 rows: raw, + CRF (another variant's raw masks), + AffinityNet (the refined masks of a run)
    row.update(refined_miou=0.52, refined_boundary_f1=0.31, refined_confusion=1.2, affinity_train_s=200.0,
               affinity_s_per_iter=0.66, refine_img_s=9.0)
    crf = dict(row, label="EPS + CRF", pseudo_miou=0.51)
    isnet = dict(row, label="EPS, defaults but IS-Net as the detector", overrides=eb.ISNET, pseudo_miou=0.49)
    text = eb.tables({"variants": {"eps": row, "eps_isnet": isnet, "eps_crf_floor": crf}, "command": "c", "machine": "m"})
    assert "| EPS, defaults | 0.500 | - | 0.520 | 0.310 | 1.20 | 200 (0.66) | 9.0 |" in text
    assert "| EPS, defaults but IS-Net | 0.490 | 0.510 | 0.520 | 0.310 | 1.20 | 200 (0.66) | 9.0 |" in text
    # a row measured with the earlier background rule, or with IS-Net, says so where its label does not
    old = dict(row, label="EPS, old", overrides=f"{eb.SAL_BG},{eb.ISNET}")
    text = eb.tables({"variants": {"eps_saliency": old, "eps_isnet": isnet}, "command": "c", "machine": "m"})
    assert "| EPS, old (IS-Net, background 1 - saliency) | 0.500 |" in text
    assert "| EPS, defaults but IS-Net as the detector | 0.490 |" in text    # its label says it already
    # a row whose rescue ran its crops at the whole images' 512 px (before input_size: auto) says so too
    crops = dict(row, label="EPS, IS-Net", overrides=f"{eb.ISNET},{eb.RESCUE_512}")
    text = eb.tables({"variants": {"eps_isnet": crops}, "command": "c", "machine": "m"})
    assert "| EPS, IS-Net (rescue crops at 512) | 0.500 |" in text


def test_a_copy_from_a_finished_run_keeps_its_outputs_and_lock_under_this_checkouts_code(tmp_path):
    base = tmp_path / "base"
    cv.make_copy(base)
    lock = "schema: '2.0'\nstages: {}\n"          # the base's run, as its lock records it
    (base / "dvc.lock").write_text(lock)
    (base / "data" / "saliency").mkdir(parents=True, exist_ok=True)
    (base / "data" / "saliency" / "a.png").write_bytes(b"the base's map")
    (base / "data" / "metrics" / "saliency.json").write_text('{"from": "base"}')
    (base / "data" / "timings").mkdir(parents=True, exist_ok=True)
    (base / "data" / "timings" / "train_cls.json").write_text('{"perf": {"sec_per_iter": 9.9}}')
    (base / "repro.log").write_text("the base's log")
    (base / "params.yaml").write_text("seed: 7\n")
    (base / "tasks" / "train_cls.py").write_text("# older code\n")

    dest = tmp_path / "copy"
    cv.make_copy(dest, base)
    # what the base's run made, with the lock that records it: DVC skips the stages a variant keeps
    assert (dest / "data" / "saliency" / "a.png").read_bytes() == b"the base's map"
    assert (dest / "data" / "metrics" / "saliency.json").read_text() == '{"from": "base"}'
    assert (dest / "dvc.lock").read_text() == lock
    # the base's timings would pass for the variant's, its log for the variant's log
    assert not (dest / "data" / "timings").exists() and not (dest / "repro.log").exists()
    # this checkout's code and params (the variant's overrides go on top of them)
    for rel in ("params.yaml", "tasks/train_cls.py", "dvc.yaml"):
        assert (dest / rel).read_bytes() == (REPO / rel).read_bytes()
    assert cv.collect(dest)["s_per_iter"] is None


def test_from_must_be_a_finished_run_that_no_variant_writes_over(tmp_path):
    with pytest.raises(SystemExit, match="not a finished run's folder"):
        cv.check_base(tmp_path, [tmp_path / "out" / "eps"])
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    cv.check_base(tmp_path, [tmp_path / "out" / "eps"])
    with pytest.raises(SystemExit, match="would write over it"):
        cv.check_base(tmp_path, [tmp_path / "out" / "eps", tmp_path])
