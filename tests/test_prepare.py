"""The prepare stage: generates or checks the dataset, records it, and never leaves half an output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from core.config import ConfigError, Params, build
from dataio import synthetic
from dataio.files import DatasetError
from dataio.manifest import open_dataset
from tasks import prepare

REPO = Path(__file__).resolve().parents[1]
TINY_PREPARE = dict(seed=1, num_train=12, num_val=6, image_size=40, num_classes=5, co_occurrence_rate=0.85,
                    min_objects=1, max_objects=3, preview_count=4)


def make_params(dataset: dict | None = None, **prepare_overrides) -> Params:
    return build(Params, {"dataset": dataset or {"kind": "synthetic"},
                          "prepare": {**TINY_PREPARE, **prepare_overrides}})


def test_synthetic_stage_writes_dataset_manifest_preview_and_metrics(tmp_path):
    out, metrics_path = tmp_path / "data" / "prepared", tmp_path / "data" / "metrics" / "prepare.json"
    metrics = prepare.run(make_params(), out, metrics_path, workers=2, progress=False)

    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["kind"] == "voc" and manifest["root"] == "synthetic"
    assert manifest["labels"] == "synthetic/cls_labels.npy"
    assert [c["name"] for c in manifest["contexts"]] == ["rail", "water", "sky", "road", "grass"]
    root = out / "synthetic"
    for rel in ("JPEGImages/train_00000.jpg", "SegmentationClass/val_00005.png", "ContextMaps/train_00011.png",
                "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt", "cls_labels.npy",
                "labels.csv", "class_names.txt", "contexts.json"):
        assert (root / rel).is_file(), rel
    assert (root / "labels.csv").read_text().splitlines()[0] == "image_id,labels"
    assert Image.open(root / "SegmentationClass" / "train_00000.png").mode == "P"

    ds = open_dataset(out / "dataset.json")
    assert ds.ids("train") == [f"train_{i:05d}" for i in range(12)] and len(ds.ids("val")) == 6
    assert ds.context_class == {k: k - 1 for k in range(1, 6)}

    with Image.open(out / "preview.png") as im:           # 4 rows of image | mask | context, 40 px -> 6x
        assert im.mode == "RGB" and im.width >= 3 * 6 * 40 and im.height >= 4 * 6 * 40

    assert json.loads(metrics_path.read_text()) == metrics
    for split, n in (("train", 12), ("val", 6)):
        entry = metrics["splits"][split]
        assert entry["images"] == n
        counts = entry["class_counts"]
        assert list(counts) == synthetic.class_names(5)
        labels = np.stack([ds.labels(i) for i in ds.ids(split)])
        assert [counts[c]["images"] for c in counts] == labels.sum(0).astype(int).tolist()
        masks = np.stack([ds.load_mask(i) for i in ds.ids(split)])
        assert [counts[c]["pixels"] for c in counts] == [int((masks == k + 1).sum()) for k in range(5)]
        co = entry["co_occurrence"]
        assert co["objects"] == entry["generated"]["objects"]
        assert 0.0 <= co["rate"] <= 1.0 and co["objects_on_own_context"] <= co["objects"]
        assert entry["generated"]["mean_objects_per_image"] >= 1.0
    assert metrics["co_occurrence_rate_param"] == 0.85
    # nothing but the outputs is left next to them
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics", "prepared"]


def test_rerun_replaces_the_output(tmp_path):
    out, metrics = tmp_path / "prepared", tmp_path / "prepare.json"
    prepare.run(make_params(num_train=8), out, metrics, workers=1, progress=False)
    first = (out / "synthetic" / "JPEGImages" / "train_00000.jpg").read_bytes()
    prepare.run(make_params(num_train=5, seed=2), out, metrics, workers=1, progress=False)
    assert len(list((out / "synthetic" / "JPEGImages").iterdir())) == 5 + 6
    assert (out / "synthetic" / "JPEGImages" / "train_00000.jpg").read_bytes() != first


def test_an_exception_midway_leaves_no_output(tmp_path, monkeypatch):
    out, metrics = tmp_path / "prepared", tmp_path / "prepare.json"
    real = synthetic.generate_sample
    calls = []

    def failing(cfg, split_index, index):
        calls.append(index)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(cfg, split_index, index)

    monkeypatch.setattr(synthetic, "generate_sample", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare.run(make_params(), out, metrics, workers=1, progress=False)
    assert not out.exists() and not metrics.exists()
    assert list(tmp_path.iterdir()) == []                  # temporary folder removed too


def test_a_killed_run_leaves_the_previous_output_untouched(tmp_path):
    out, metrics = tmp_path / "prepared", tmp_path / "prepare.json"
    prepare.run(make_params(num_train=3, num_val=2), out, metrics, workers=1, progress=False)
    before = (out / "dataset.json").read_text()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {**TINY_PREPARE, "num_train": 20000, "image_size": 64}}))
    proc = subprocess.Popen([sys.executable, "-m", "tasks.prepare", "--params", str(params), "--out", str(out),
                             "--metrics", str(metrics)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:       # wait until it is writing images
            temps = list(tmp_path.glob(".prepared.tmp-*/synthetic/JPEGImages"))
            if temps and len(os.listdir(temps[0])) >= 20:
                break
            assert proc.poll() is None, "the stage ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the stage wrote no images within 60 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)      # the stage and its worker processes
        proc.wait()
    assert (out / "dataset.json").read_text() == before
    assert len(list((out / "synthetic" / "JPEGImages").iterdir())) == 5
    # the next run clears the killed run's temporary folder
    prepare.run(make_params(num_train=2, num_val=1), out, metrics, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepare.json", "prepared"]


def test_voc_kind_checks_and_records_without_generating(tiny_voc, tmp_path):
    out, metrics_path = tmp_path / "prepared", tmp_path / "prepare.json"
    params = make_params({"kind": "voc", "root": str(tiny_voc), "labels": "cls_labels.npy"})
    metrics = prepare.run(params, out, metrics_path, workers=2, progress=False)
    assert not (out / "synthetic").exists()
    ds = open_dataset(out / "dataset.json")
    assert ds.root.resolve() == tiny_voc.resolve() and ds.class_names == ["cat", "dog", "boat"]
    assert (out / "preview.png").is_file()
    train = metrics["splits"]["train"]
    assert train["images"] == 4 and "co_occurrence" not in train and "generated" not in train
    labels = np.stack([ds.labels(i) for i in ds.ids("train")])
    assert [train["class_counts"][c]["images"] for c in ds.class_names] == labels.sum(0).astype(int).tolist()
    assert "co_occurrence_rate_param" not in metrics


def test_voc_kind_with_a_broken_file_fails_before_writing(tiny_voc, tmp_path):
    (tiny_voc / "JPEGImages" / "tr_001.jpg").unlink()
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError, match="tr_001.jpg"):
        prepare.run(make_params({"kind": "voc", "root": str(tiny_voc)}), out, tmp_path / "m.json",
                    workers=1, progress=False)
    assert not out.exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("dataset, key", [
    ({"kind": "synthetic", "class_names": ["a", "b", "c", "d", "e"]}, "dataset.class_names"),
    ({"kind": "synthetic", "train_split": "train_aug"}, "dataset.train_split"),
])
def test_dataset_keys_that_cannot_apply_to_synthetic_data_are_rejected(tmp_path, dataset, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        prepare.run(make_params(dataset), tmp_path / "prepared", tmp_path / "m.json", progress=False)
    assert not (tmp_path / "prepared").exists()


def test_command_line_entry(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {**TINY_PREPARE, "num_train": 4, "num_val": 2}}))
    args = ["--params", str(params), "--out", str(tmp_path / "prepared"), "--metrics", str(tmp_path / "m.json")]
    assert prepare.main(args) == 0
    assert "prepare:" in capsys.readouterr().out and (tmp_path / "prepared" / "dataset.json").is_file()
    params.write_text(yaml.safe_dump({"prepare": {**TINY_PREPARE, "num_classes": 12}}))
    assert prepare.main(args) == 2
    assert "'prepare.num_classes'" in capsys.readouterr().err
