"""The synthetic co-occurrence dataset: deterministic, balanced, consistent, and as co-occurring as asked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from core.config import ConfigError, PrepareConfig, build
from dataio import synthetic, synthetic_layout
from dataio.labels import read_label_file
from dataio.voc import VOCDataset

TINY = dict(seed=3, num_train=10, num_val=6, image_size=48, num_classes=5, co_occurrence_rate=0.85,
            min_objects=1, max_objects=3, preview_count=0)


def tiny_cfg(**overrides) -> PrepareConfig:
    return build(PrepareConfig, {**TINY, **overrides}, "prepare")


def samples(cfg: PrepareConfig, n: int) -> list[synthetic.Sample]:
    return [synthetic.generate_sample(cfg, 0, i) for i in range(n)]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_params_give_byte_identical_files_serial_or_parallel(tmp_path):
    cfg = tiny_cfg()
    synthetic.write_dataset(cfg, tmp_path / "a", workers=2, progress=False)
    synthetic.write_dataset(cfg, tmp_path / "b", workers=1, progress=False)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len([k for k in a if k.startswith("JPEGImages/")]) == cfg.num_train + cfg.num_val
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    other = synthetic.generate_sample(tiny_cfg(seed=4), 0, 0)
    assert not np.array_equal(other.image, synthetic.generate_sample(cfg, 0, 0).image)


def test_images_do_not_depend_on_each_other():
    # image i of a 3-image run equals image i of a 1000-image run: per-image seeds, resumable
    small, large = tiny_cfg(num_train=3), tiny_cfg(num_train=1000)
    assert np.array_equal(synthetic.generate_sample(small, 0, 2).image, synthetic.generate_sample(large, 0, 2).image)
    assert not np.array_equal(synthetic.generate_sample(small, 0, 2).image,
                              synthetic.generate_sample(small, 1, 2).image)   # train and val differ


def test_images_masks_labels_and_contexts_agree():
    cfg = tiny_cfg(image_size=64, num_classes=8)
    lone_images = 0
    for s in samples(cfg, 60):
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == s.context.shape == (64, 64)
        values = set(np.unique(s.mask).tolist())
        assert values <= set(range(cfg.num_classes + 1))
        in_mask = sorted(v - 1 for v in values if v > 0)
        assert np.flatnonzero(s.labels).tolist() == in_mask
        assert s.labels.dtype == np.float32 and s.labels.shape == (cfg.num_classes,)
        assert in_mask, "every image has at least one visible object"
        assert set(in_mask) == set(s.object_classes)                  # no object is hidden entirely
        assert not (s.context[s.mask > 0]).any(), "context pixels are background in the mask"
        contexts = set(np.unique(s.context).tolist()) - {0}
        assert contexts <= set(range(1, cfg.num_classes + 1))
        without_class = {k for k in contexts if k - 1 not in in_mask}
        assert len(without_class) <= 1 and without_class <= {s.lone_context}
        lone_images += bool(without_class)
    assert lone_images <= 60 * 0.2                     # contexts rarely appear without their class


def test_every_class_gets_a_fair_share():
    cfg = tiny_cfg(image_size=48)
    counts = np.zeros(cfg.num_classes)
    for s in samples(cfg, 150):
        np.add.at(counts, s.object_classes, 1)
    expected = counts.sum() / cfg.num_classes
    assert counts.min() >= 0.6 * expected and counts.max() <= 1.4 * expected, counts


@pytest.mark.parametrize("rate", [0.8, 0.3])
def test_measured_co_occurrence_matches_the_param(rate):
    cfg = tiny_cfg(image_size=64, co_occurrence_rate=rate, min_objects=2, max_objects=3)
    measured = []
    for s in samples(cfg, 70):
        measured += synthetic.measure_objects(s.mask, s.context, {k: k - 1 for k in range(1, 6)})
    assert len(measured) >= 150
    rate_measured = np.mean([o.on_own_context for o in measured])
    assert abs(rate_measured - rate) <= 0.1, rate_measured


def test_no_co_occurrence_when_the_rate_is_zero():
    cfg = tiny_cfg(image_size=48, co_occurrence_rate=0.0)
    measured = [o for s in samples(cfg, 40)
                for o in synthetic.measure_objects(s.mask, s.context, {k: k - 1 for k in range(1, 6)})]
    assert np.mean([o.on_own_context for o in measured]) <= 0.05


def test_contexts_are_larger_than_their_objects():
    cfg = tiny_cfg(image_size=64, co_occurrence_rate=1.0, max_objects=1)
    ratios = [(s.context > 0).sum() / (s.mask > 0).sum() for s in samples(cfg, 30)]
    assert np.median(ratios) >= 1.5, ratios


@pytest.mark.parametrize("cls", range(len(synthetic.CLASS_NAMES)))
def test_objects_are_silhouettes_with_a_small_key_part(cls):
    design = synthetic_layout._DESIGNS[cls]
    rng = np.random.default_rng(cls)
    w, h = (120, 120 / design.aspect) if design.aspect >= 1 else (120 * design.aspect, 120)
    polys = synthetic_layout._layout_object(design, rng, w, h)
    canvas = {role: np.zeros((200, 200), np.uint8) for role, _ in polys}
    for role, pts in polys:
        synthetic_layout._fill(canvas[role], pts + 100)
    silhouette = np.any(np.stack(list(canvas.values())), axis=0)
    ys, xs = np.nonzero(silhouette)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert silhouette.sum() / box < 0.85, "not a box"
    key_share = canvas["key"].astype(bool).sum() / silhouette.sum()
    assert 0.03 <= key_share <= 0.2, key_share          # sparse coverage: the class cue is small


def test_written_dataset_reads_back_through_the_dataset_layer(tmp_path):
    cfg = tiny_cfg()
    records = synthetic.write_dataset(cfg, tmp_path, workers=1, progress=False)
    ds = VOCDataset(tmp_path, labels=tmp_path / "cls_labels.npy")
    ds.validate(["train", "val"], progress=False)
    assert ds.class_names == list(synthetic.CLASS_NAMES[:5])
    assert ds.context_names == ["rail", "water", "sky", "road", "grass"]
    assert ds.context_class == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    spec = json.loads((tmp_path / "contexts.json").read_text())
    assert spec["names"] == ds.context_names and spec["class_of_context"]["3"] == 2
    assert ds.ids("train") == [f"train_{i:05d}" for i in range(cfg.num_train)]
    csv_labels = read_label_file(tmp_path / "labels.csv", ds.class_names)
    for rec in records:
        mask = ds.load_mask(rec["id"])
        assert np.array_equal(ds.labels(rec["id"]), rec["labels"])
        assert np.array_equal(csv_labels[rec["id"]], rec["labels"])
        present = np.unique(mask)
        assert np.flatnonzero(rec["labels"]).tolist() == [int(v) - 1 for v in present if v > 0]
        assert ds.load_image(rec["id"]).shape == (cfg.image_size, cfg.image_size, 3)
        assert ds.load_context(rec["id"]).shape == mask.shape


@pytest.mark.parametrize("key, value", [("num_classes", 9), ("num_classes", 4), ("image_size", 16),
                                        ("co_occurrence_rate", 1.2), ("num_train", 0)])
def test_bad_params_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'prepare.{key}'"):
        build(PrepareConfig, {**TINY, key: value}, "prepare")


def test_generator_accepts_every_valid_object_range():
    for lo, hi in [(1, 1), (3, 3)]:
        cfg = dataclasses.replace(tiny_cfg(), min_objects=lo, max_objects=hi)
        for s in samples(cfg, 10):
            assert lo <= len(s.object_classes) <= hi
