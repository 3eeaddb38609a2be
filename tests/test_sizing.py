"""Size-aware defaults (core/sizing.py): ``auto`` knobs resolved from the images' median long side."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from core.config import ConfigError, Params, PredictSegConfig, SaliencyConfig, TrainClsConfig, build, load_params
from core.sizing import auto_knobs, auto_values, resolve, sized
from dataio.manifest import open_dataset
from tasks import prepare

# the values the project used before `auto` existed, sized by hand for the 128-px embedded images
EMBEDDED = {
    "saliency": {"input_size": 512},
    "train_cls": {"output_stride": 16, "crop_size": 128, "resize_long": [96, 160]},
    "train_seg": {"output_stride": 16, "crop_size": 128, "scale_range": [1.0, 2.0]},
    "predict_seg": {"scales": [1.25, 1.5, 1.75]},
    "train_affinity": {"output_stride": 16, "crop_size": 128, "scale_range": [1.0, 1.5], "feature_stride": 4},
}

# by hand from the rules in core/sizing.py's docstring
RULES = {
    # 64 px: 4 cells at stride 16 -> stride 8; s = max(1, 12 * 8 / 64) = 1.5; 4 x 64 = 256 -> 320
    64: {"saliency": {"input_size": 320},
         "train_cls": {"output_stride": 8, "crop_size": 64, "resize_long": [48, 80]},
         "train_seg": {"output_stride": 8, "crop_size": 64, "scale_range": [1.0, 2.0]},
         "predict_seg": {"scales": [1.25, 1.5, 1.75]},
         "train_affinity": {"output_stride": 8, "crop_size": 64, "scale_range": [1.0, 1.5], "feature_stride": 4}},
    # 160 px: stride 16; s = 12 * 16 / 160 = 1.2; 4 x 160 = 640 -> 512, U²-Net-p's cap (the default detector)
    160: {"saliency": {"input_size": 512},
          "train_cls": {"output_stride": 16, "crop_size": 160, "resize_long": [120, 200]},
          "train_seg": {"output_stride": 16, "crop_size": 160, "scale_range": [0.8, 1.6]},
          "predict_seg": {"scales": [1.0, 1.2, 1.4]},
          "train_affinity": {"output_stride": 16, "crop_size": 160, "scale_range": [0.8, 1.2],
                             "feature_stride": 4}},
    # 500 px (500 x 375 images, as most of VOC): crop capped at 448, s = 1, an 8-stride grid of 62 cells;
    # 4 x 500 = 2000 -> U²-Net-p's 512
    500: {"saliency": {"input_size": 512},
          "train_cls": {"output_stride": 16, "crop_size": 448, "resize_long": [375, 625]},
          "train_seg": {"output_stride": 16, "crop_size": 448, "scale_range": [0.67, 1.33]},
          "predict_seg": {"scales": [0.83, 1.0, 1.17]},
          "train_affinity": {"output_stride": 16, "crop_size": 448, "scale_range": [0.67, 1.0],
                             "feature_stride": 8}},
}


def test_auto_on_the_embedded_images_gives_the_hand_sized_values():
    assert auto_values(128) == EMBEDDED


@pytest.mark.parametrize("long_side", sorted(RULES))
def test_auto_knobs_resolve_as_documented_from_what_prepare_measured(make_voc, tmp_path, monkeypatch, long_side):
    """A VOC-layout folder of ``long_side`` px images through prepare; every stage's auto knobs resolve from
    the size recorded in the manifest (no image opened again) and prepare's metrics list them."""
    size = (375, 500) if long_side == 500 else (long_side, long_side)
    root = make_voc(f"voc{long_side}", size=size, n_train=3, n_val=1)
    monkeypatch.chdir(tmp_path)
    params = build(Params, {"dataset": {"kind": "voc", "root": str(root), "labels": "cls_labels.npy"}})
    metrics = prepare.run(params, tmp_path / "prepared", tmp_path / "prepare.json", project_dir=tmp_path,
                          workers=1, progress=False)
    assert metrics["splits"]["train"]["image_size"]["long"] == {"min": long_side, "median": long_side,
                                                               "max": long_side}
    assert {k: v for k, v in metrics["auto_sizes"].items() if k != "median_long_side"} == RULES[long_side]
    manifest = tmp_path / "prepared" / "dataset.json"
    assert json.loads(manifest.read_text())["image_size"]["train"]["long"]["median"] == long_side
    ds = open_dataset(manifest)
    ds.image_size = None   # resolution must read the manifest, not the images
    defaults = Params()
    for section, values in RULES[long_side].items():
        resolved = sized(getattr(defaults, section), section, ds)
        assert {k: getattr(resolved, k) for k in values} == values, section


@pytest.mark.parametrize("long_side, isnet, u2netp", [(64, 320, 320), (128, 512, 512), (160, 640, 512),
                                                     (256, 1024, 512), (500, 1024, 512)])
def test_the_saliency_input_is_capped_by_the_detector(long_side, isnet, u2netp):
    """4 L within [320, 1024] for IS-Net (trained at 1024), within [320, 512] for U²-Net-p (trained at 320)."""
    for backend, expected in (("isnet", isnet), ("u2netp", u2netp), ("onnx", isnet)):
        cfg = build(SaliencyConfig, {"backend": backend, **({"model_path": "m.onnx"} if backend == "onnx" else {})},
                    "saliency")
        assert resolve(cfg, "saliency", long_side).input_size == expected
        assert auto_values(long_side, backend)["saliency"]["input_size"] == expected


def test_an_explicit_value_wins_and_resnet38d_keeps_stride_8():
    cfg = build(TrainClsConfig, {"crop_size": 96, "backbone": "resnet38d", "weights_path": "w.pth"}, "train_cls")
    out = resolve(cfg, "train_cls", 500)
    assert (out.crop_size, out.resize_long, out.output_stride) == (96, [375, 625], 8)
    assert resolve(build(PredictSegConfig, {"scales": [1.0]}), "predict_seg", 64).scales == [1.0]


def test_the_defaults_are_auto_and_the_paper_configs_stay_explicit():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assert auto_knobs(Params().train_cls) == ["output_stride", "crop_size", "resize_long"]
    assert auto_knobs(Params().predict_seg) == ["scales"]
    for name in ("voc12.yaml", "voc12_seg.yaml"):
        params = load_params(repo / "configs" / name)
        for section in yaml.safe_load((repo / "configs" / name).read_text()):
            if dataclasses.is_dataclass(getattr(params, section)):
                assert auto_knobs(getattr(params, section)) == [], (name, section)


@pytest.mark.parametrize("key, value, needle", [
    ("crop_size", "atuo", "'train_cls.crop_size' must be an integer or 'auto', got 'atuo'"),
    ("resize_long", "big", "'train_cls.resize_long' must be a list or 'auto', got 'big'"),
    ("output_stride", 12, "'train_cls.output_stride' = 12 is not one of 8, 16"),
    ("resize_long", [100, 50], "'train_cls.resize_long' must be [min, max]"),
])
def test_a_bad_sized_knob_is_named(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build(TrainClsConfig, {key: value}, "train_cls")
