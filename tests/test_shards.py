"""Per-image stages in shards (core.shards): shard K of N computes ids[K::N] into its own folder and the
stage's next run adopts them; the result is byte-identical to a serial run, also when the shards run
on a Dask LocalCluster of 2 workers through the Prefect flow's task runner (flows.shards)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import StageProject
from test_infer_cam import META, ColourMaps, _Images

from core.config import InferCamConfig
from core.shards import adopt_shards, parse_shard, shard_dir, shard_items
from tasks import saliency
from tasks.infer_cam import infer_dataset


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shard_spec_items_and_folders():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "2/0"):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)
    items = list("abcdefg")
    shards = [shard_items(items, (k, 3)) for k in range(3)]
    assert shards == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert sorted(sum(shards, [])) == items
    assert shard_dir(Path("/x/data/.cams.partial"), (1, 3)) == Path("/x/data/.cams.partial.shard-1-of-3")


def test_adopt_takes_matching_shards_only_and_removes_every_shard_folder(tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "a.png").write_bytes(b"mine")
    for k, fp, names in ((0, "same", ["a.png", "b.png", ".c.png.tmp"]), (1, "other", ["d.png"])):
        folder = shard_dir(partial, (k, 2))
        folder.mkdir()
        (folder / "fp").write_text(fp)
        for name in names:
            (folder / name).write_bytes(name.encode())
    moved = adopt_shards(partial, lambda d: (d / "fp").read_text() == "same", "*.png")
    assert moved == 1                                        # b.png; a.png was already there, d.png is stale
    assert _files(partial) == {"a.png": b"mine", "b.png": b"b.png"}
    assert not list(tmp_path.glob("out.partial.shard-*"))


def test_infer_cam_shards_merge_to_the_serial_bytes(tmp_path):
    data = _Images(n=5)
    model = ColourMaps(np.random.default_rng(0).normal(size=(4, 3)) * 3).eval()
    cfg = InferCamConfig(scales=[1.0, 1.5], threads=1, channels_last=False, precision="fp32")
    infer_dataset(cfg, data, model, META, tmp_path / "serial", progress=False)
    for k in range(2):
        res = infer_dataset(cfg, data, model, META, tmp_path / "cams", progress=False, shard=(k, 2))
        assert res["ids"] == data.ids("train")[k::2] and res["timing"]["images"] == len(res["ids"])
    assert not (tmp_path / "cams").exists()                  # a shard publishes nothing
    merged = infer_dataset(cfg, data, model, META, tmp_path / "cams", progress=False)
    assert merged["timing"]["images"] == 0                   # everything came from the shards
    assert _files(tmp_path / "cams") == _files(tmp_path / "serial")
    assert not [p for p in tmp_path.iterdir() if "shard" in p.name]


def test_a_shard_of_another_config_is_not_adopted(tmp_path):
    data = _Images(n=4)
    model = ColourMaps(np.random.default_rng(0).normal(size=(4, 3)) * 3).eval()
    infer_dataset(InferCamConfig(scales=[1.0], threads=1), data, model, META, tmp_path / "cams", progress=False,
                  shard=(0, 2))
    merged = infer_dataset(InferCamConfig(scales=[0.5], threads=1), data, model, META, tmp_path / "cams",
                           progress=False)
    assert merged["timing"]["images"] == 4                   # all inferred again under the new scales


@pytest.fixture
def saliency_project(make_voc, tmp_path, monkeypatch) -> StageProject:
    project = StageProject(tmp_path / "project", make_voc(n_train=5, n_val=3))
    project.set_params("saliency", backend="spectral_residual", workers=1)
    monkeypatch.chdir(project.root)
    return project


def test_saliency_shards_by_hand_merge_to_the_serial_bytes(saliency_project):
    root = saliency_project.root
    assert saliency_project.run("saliency") == 0
    serial = _files(root / "data" / "saliency"), (root / "data" / "metrics" / "saliency.json").read_bytes()
    shutil.rmtree(root / "data" / "saliency")
    module, args = saliency_project.command("saliency")
    for k in range(3):
        assert saliency.main([*args, "--shard", f"{k}/3"]) == 0
    assert not (root / "data" / "saliency").exists()
    assert saliency_project.run("saliency") == 0
    merged = _files(root / "data" / "saliency"), (root / "data" / "metrics" / "saliency.json").read_bytes()
    assert merged == serial
    assert json.loads(serial[1])["train"]["images"] == 5


def test_a_bad_shard_spec_names_the_option(saliency_project, capsys):
    _, args = saliency_project.command("saliency")
    with pytest.raises(SystemExit):
        saliency.main([*args, "--shard", "2/2"])
    assert "--shard must be K/N with 0 <= K < N" in capsys.readouterr().err


def test_saliency_shards_on_a_dask_local_cluster_through_the_flow(saliency_project):
    # the flow's sharded stage: 2 shards mapped by Prefect's DaskTaskRunner over a LocalCluster of 2
    # worker processes, then the stage's own run merges them: byte-identical to the serial run
    from prefect.testing.utilities import prefect_test_harness

    from flows.shards import run_shards

    root = saliency_project.root
    assert saliency_project.run("saliency") == 0
    serial = _files(root / "data" / "saliency")
    shutil.rmtree(root / "data" / "saliency")
    shutil.copy(Path(__file__).resolve().parents[1] / "dvc.yaml", root / "dvc.yaml")   # the shard's command
    with prefect_test_harness(server_startup_timeout=300):
        lines = run_shards("saliency", root, 2)
    assert len(lines) == 2 and all("shard" in line for line in lines)
    assert sorted(p.name for p in (root / "data").iterdir() if "shard" in p.name) == [
        "saliency.partial.shard-0-of-2", "saliency.partial.shard-1-of-2"]
    assert saliency_project.run("saliency") == 0
    assert _files(root / "data" / "saliency") == serial
