"""train_seg / predict_seg: augmentation, HDF5 masks through workers, resume after SIGKILL, DDP,
a segmenter that learns, prediction shapes, params, resume and errors, predict_seg -> evaluate_seg as
dvc.yaml runs them, and the whole DAG in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ColourBlocks, StageProject, write_voc_dataset
from torch.utils.data import DataLoader

from artifacts.pseudo_masks import PngMasks, PseudoMaskWriter
from core.config import PredictSegConfig, TrainSegConfig, build
from dataio.voc import VOCDataset
from models.deeplab import load_segmenter
from tasks import predict_seg, train_seg
from tasks.train_seg import (
    IGNORE,
    MaskSource,
    ResumableBatchSampler,
    SegTrainSamples,
    TrainSegError,
    augment,
    segmentation_loss,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "boat")


def make_dataset(root: Path, n_train: int = 8, n_val: int = 3, size: tuple[int, int] = (32, 32)) -> VOCDataset:
    write_voc_dataset(root, n_train=n_train, n_val=n_val, size=size, class_names=CLASSES)
    return VOCDataset(root, labels=root / "cls_labels.npy")


def pseudo_mask(gt: np.ndarray) -> np.ndarray:
    """A pseudo-mask that differs from the ground truth: the object boxes shifted by one pixel,
    the top row left undecided (255)."""
    out = np.roll(np.where(gt == 255, 0, gt), 1, axis=1).astype(np.uint8)
    out[0] = 255
    return out


def write_pseudo_masks(path: Path, reader: VOCDataset, ids=None) -> Path:
    with PseudoMaskWriter(path, list(reader.class_names), {"method": "test"}) as w:
        for image_id in ids if ids is not None else reader.ids("train") + reader.ids("val"):
            w.add(image_id, pseudo_mask(reader.load_mask(image_id)))
    return path


def tiny_cfg(**over) -> TrainSegConfig:
    base = dict(head="aspp", backbone="efficientnet_lite0", output_stride=16, aspp_rates=[1, 2], iterations=4,
                conf_fg_margin=0.0, conf_bg_margin=0.0,  # every pixel as written (the files hold no CAMs)
                batch_size=4, crop_size=32, scale_range=[0.75, 1.25], lr=1e-3, grad_clip=0.0, checkpoint_every=2, log_every=1,
                threads=1, workers=0, device="cpu")
    base.update(over)
    return build(TrainSegConfig, base, "train_seg")


# --------------------------------------------------------------------------- data


def test_augment_keeps_image_and_mask_aligned_and_pads_with_ignore():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(20, 28)).astype(np.uint8)
    image = np.stack([mask * 60, mask * 10, np.full_like(mask, 7)], axis=-1).astype(np.uint8)
    pad = np.array([0.5, 0.25, 0.75], np.float32)
    seen_flip = set()
    for seed in range(12):
        img, m = augment(image, mask, np.random.default_rng(seed), crop=36, scale_range=(1.0, 1.0),
                         flip=True, pad_value=pad)
        assert img.shape == (36, 36, 3) and img.dtype == np.float32 and m.shape == (36, 36)
        pad_px = m == IGNORE
        assert pad_px.sum() == 36 * 36 - 20 * 28                      # the crop is larger: all of it kept
        np.testing.assert_allclose(img[pad_px], np.broadcast_to(pad, img[pad_px].shape))
        inside = ~pad_px
        np.testing.assert_array_equal(np.round(img[inside][:, 0] * 255 / 60).astype(np.uint8), m[inside])
        rows = np.flatnonzero(inside.any(1))
        cols = np.flatnonzero(inside.any(0))
        block = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        seen_flip.add("flip" if np.array_equal(block, mask[:, ::-1]) else "same")
        assert np.array_equal(block, mask) or np.array_equal(block, mask[:, ::-1])
    assert seen_flip == {"flip", "same"}
    # rescaling: masks stay labels (nearest), never interpolated values
    _, m = augment(image, mask, np.random.default_rng(1), crop=16, scale_range=(0.5, 1.5), flip=False,
                   pad_value=pad)
    assert set(np.unique(m)) <= {0, 1, 2, 3, IGNORE}


def test_loss_ignores_255_and_an_all_ignored_batch_gives_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[:, :3] = IGNORE
    loss = segmentation_loss(logits, target)
    keep = target != IGNORE
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[~keep] == 0)   # ignored pixels give no gradient
    empty = segmentation_loss(logits, torch.full((2, 8, 8), IGNORE))
    assert empty.item() == 0.0 and torch.isfinite(empty)


class _WithPid(SegTrainSamples):
    def __getitem__(self, key):
        item = super().__getitem__(key)
        item["pid"] = os.getpid()
        return item


def test_hdf5_pseudo_masks_are_read_through_several_workers(tmp_path):
    reader = make_dataset(tmp_path / "voc")
    h5 = write_pseudo_masks(tmp_path / "pm.h5", reader)
    ids = reader.ids("train")
    masks = MaskSource("pseudo", reader, h5)
    masks.load(ids[0])   # a handle opened in the parent must not be inherited by the workers
    ds = _WithPid(reader, ids, masks, crop=32, scale_range=(1.0, 1.0), flip=False, pad_value=(0.5, 0.5, 0.5))
    sampler = ResumableBatchSampler(len(ids), 2, seed=0, start=0, end=8)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    pids, checked = set(), 0
    for keys, batch in zip(iter(sampler), loader):
        pids.update(batch["pid"].tolist())
        for (index, _), m in zip(keys, batch["mask"]):
            expected = pseudo_mask(reader.load_mask(ids[index]))
            np.testing.assert_array_equal(m.numpy(), expected)         # the HDF5 mask, not the GT
            checked += 1
    assert checked == 16 and len(pids) == 2 and os.getpid() not in pids
    masks.close()


# --------------------------------------------------------------------------- training


def _train(tmp_path, name, cfg, reader, h5, **kw):
    return train_seg.run(cfg, seed=1, reader=reader, masks_path=h5, out_dir=tmp_path / name,
                         state_dir=tmp_path / f"{name}_state", metrics_path=tmp_path / f"{name}.json",
                         manifest=tmp_path / "none.json", progress=False, **kw)


def test_tiny_runs_pseudo_through_workers_and_ground_truth(tmp_path):
    reader = make_dataset(tmp_path / "voc")
    h5 = write_pseudo_masks(tmp_path / "pm.h5", reader)
    summary = _train(tmp_path, "w2", tiny_cfg(workers=2, grad_clip=1.0), reader, h5)
    _train(tmp_path, "w0", tiny_cfg(workers=0, grad_clip=1.0), reader, h5)
    _train(tmp_path, "gt", tiny_cfg(mask_source="ground_truth"), reader, h5)

    model, meta = load_segmenter(tmp_path / "w2" / "segmenter.pt")
    assert meta["mask_source"] == "pseudo" and meta["class_names"] == list(CLASSES) and model.num_labels == 4
    assert summary["perf"]["workers"] == 2 and summary["perf"]["train_seconds"] > 0
    assert 0.0 <= summary["val/mIoU_single_scale"] <= 1.0
    written = json.loads((tmp_path / "w2.json").read_text())
    assert written["val/mIoU_single_scale"] == summary["val/mIoU_single_scale"]
    loss_rows = (tmp_path / "w2" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in loss_rows[1:]] == ["1", "2", "3", "4"]
    norms = (tmp_path / "w2" / "live" / "plots" / "metrics" / "train" / "grad_norm.tsv").read_text().splitlines()
    assert len(norms) == 5 and all(float(r.split("\t")[1]) > 0 for r in norms[1:])
    assert not any((tmp_path / "w2_state").glob("*/ckpt.pt"))     # removed once the segmenter exists

    def weights(name):
        return torch.load(tmp_path / name / "segmenter.pt", weights_only=True)["state_dict"]

    a, b, gt = weights("w2"), weights("w0"), weights("gt")
    assert all(torch.equal(a[k], b[k]) for k in a)                # workers do not change the result
    assert not all(torch.equal(a[k], gt[k]) for k in a)           # the masks come from the HDF5 file
    assert load_segmenter(tmp_path / "gt" / "segmenter.pt")[1]["mask_source"] == "ground_truth"


def test_bad_inputs_fail_before_training_naming_the_problem(tmp_path):
    reader = make_dataset(tmp_path / "voc")
    ids = reader.ids("train")
    partial = write_pseudo_masks(tmp_path / "partial.h5", reader, ids=ids[1:])
    with pytest.raises(TrainSegError, match=f"partial.h5.*'{ids[0]}'"):
        _train(tmp_path, "a", tiny_cfg(), reader, partial)
    with PseudoMaskWriter(tmp_path / "other.h5", ["x", "y", "z"], {}) as w:
        for i in ids:
            w.add(i, reader.load_mask(i))
    with pytest.raises(TrainSegError, match="other.h5 was exported for classes"):
        _train(tmp_path, "b", tiny_cfg(), reader, tmp_path / "other.h5")
    with PseudoMaskWriter(tmp_path / "small.h5", list(CLASSES), {}) as w:
        for i in ids:
            w.add(i, np.zeros((16, 16), np.uint8))
    with pytest.raises(TrainSegError, match=f"small.h5 \\(masks/{ids[0]}\\) is \\(16, 16\\), the image is"):
        _train(tmp_path, "c", tiny_cfg(), reader, tmp_path / "small.h5")
    with pytest.raises(ValueError, match="missing.h5"):
        _train(tmp_path, "d", tiny_cfg(), reader, tmp_path / "missing.h5")
    with pytest.raises(TrainSegError, match="train_seg.batch_size"):
        _train(tmp_path, "e", tiny_cfg(batch_size=64), reader, partial)
    with pytest.raises(TrainSegError, match="train_seg.weights_path"):
        _train(tmp_path, "f", tiny_cfg(weights_path=str(tmp_path / "nope.pth")), reader, partial)
    assert not any((tmp_path / n).exists() for n in "abcdef")
    # a label outside 0..C (and not 255) is named with the file and image when it is read
    with PseudoMaskWriter(tmp_path / "bad.h5", list(CLASSES), {}) as w:
        for i in ids:
            w.add(i, np.full((32, 32), 9, np.uint8))
    with pytest.raises(TrainSegError, match=r"bad.h5 \(masks/.*\) holds label 9; allowed 0..3 and 255"):
        _train(tmp_path, "g", tiny_cfg(iterations=1), reader, tmp_path / "bad.h5")
    assert not (tmp_path / "g").exists()


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_train_seg import resume_cfg
from dataio.voc import VOCDataset
from tasks.train_seg import run
root = Path({root!r})
reader = VOCDataset(root, labels=root / "cls_labels.npy")
def on_iteration(i):
    if i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
run(resume_cfg(), seed=3, reader=reader, masks_path={h5!r}, out_dir={out!r}, state_dir={state!r},
    metrics_path=None, manifest=root / "none.json", progress=False, on_iteration=on_iteration)
"""


def resume_cfg() -> TrainSegConfig:
    """LargeFOV with dropout: the torch generator matters, so an exact resume is a real check."""
    return tiny_cfg(head="largefov", largefov_rate=2, largefov_channels=16, dropout=0.5, iterations=6,
                    checkpoint_every=2, workers=1)


def test_resume_after_kill_gives_identical_weights(tmp_path):
    reader = make_dataset(tmp_path / "voc")
    h5 = write_pseudo_masks(tmp_path / "pm.h5", reader)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def script(name, kill_at, out, state):
        path = tmp_path / name
        path.write_text(_KILL_SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path / "voc"), h5=str(h5),
                                            kill_at=kill_at, out=str(out), state=str(state)))
        return subprocess.run([sys.executable, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    # the uninterrupted reference runs in this process (same code, same seed)
    train_seg.run(resume_cfg(), seed=3, reader=reader, masks_path=h5, out_dir=tmp_path / "ref",
                  state_dir=tmp_path / "ref_state", metrics_path=None, manifest=tmp_path / "voc" / "none.json",
                  progress=False)
    killed = script("kill.py", 5, tmp_path / "run", tmp_path / "state")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "segmenter.pt").exists()
    ckpts = list((tmp_path / "state").glob("*/ckpt.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=True)["iteration"] == 4
    assert not list((tmp_path / "state").glob("*/.*tmp*"))        # no half-written checkpoint
    resumed = script("resume.py", -1, tmp_path / "run", tmp_path / "state")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "iteration 4/6" in resumed.stderr
    a = torch.load(tmp_path / "ref" / "segmenter.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "segmenter.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "run" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]



def test_an_unreadable_checkpoint_is_an_error_naming_the_file(tmp_path):
    reader = make_dataset(tmp_path / "voc")
    h5 = write_pseudo_masks(tmp_path / "pm.h5", reader)

    def stop(i):
        if i == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "seg", tiny_cfg(), reader, h5, on_iteration=stop)
    [ckpt] = (tmp_path / "seg_state").glob("*/ckpt.pt")
    ckpt.write_bytes(b"")
    with pytest.raises(TrainSegError, match=f"resume checkpoint {re.escape(str(ckpt))} is unreadable.*delete it"):
        _train(tmp_path, "seg", tiny_cfg(), reader, h5)
    assert not (tmp_path / "seg" / "segmenter.pt").exists()

def _stage_run(project: StageProject, *launcher: str, out: str) -> subprocess.CompletedProcess:
    module, args = project.command("train_seg")
    args = [*args, "--out", out, "--state-dir", f"{out}_state", "--metrics", "", "--timings", f"{out}.json"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *launcher, "-m", module, *args], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_stage_starts_its_ddp_processes_and_equals_a_hand_typed_torchrun(make_voc, tmp_path):
    # train_seg.processes: 2 -> `python -m tasks.train_seg` (what dvc.yaml runs) starts 2 gloo workers
    # itself; the weights equal those of the same stage under a hand-typed torchrun (a multi-node run's
    # form, where the stage does not start workers of its own)
    project = StageProject(tmp_path / "project", make_voc(n_train=4, n_val=2))
    project.set_params("train_seg", mask_source="ground_truth", pretrained=False, iterations=2, batch_size=4,
                       crop_size=32, output_stride=16, aspp_rates=[1, 2], threads=1, workers=0, processes=2,
                       checkpoint_every=1, device="cpu")
    by_stage = _stage_run(project, out="by_stage")
    assert by_stage.returncode == 0, by_stage.stderr[-3000:]
    assert "starting 2 DDP processes" in by_stage.stderr
    assert "trained by 2 DDP processes" in by_stage.stdout
    assert json.loads((project.root / "by_stage.json").read_text())["perf"]["processes"] == 2
    by_hand = _stage_run(project, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", out="by_hand")
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert "starting" not in by_hand.stderr
    (a, meta), (b, _) = (load_segmenter(project.root / d / "segmenter.pt") for d in ("by_stage", "by_hand"))
    assert meta["num_classes"] == 3
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_failing_ddp_worker_fails_the_stage_with_a_message(make_voc, tmp_path):
    project = StageProject(tmp_path / "project", make_voc(n_train=4, n_val=2))
    # 4 images cannot fill a global batch of 3 split over 2 processes: every worker stops with an error
    project.set_params("train_seg", mask_source="ground_truth", pretrained=False, iterations=1, batch_size=3,
                       crop_size=32, threads=1, workers=0, processes=2, device="cpu")
    proc = _stage_run(project, out="failed")
    assert proc.returncode == 2
    assert "DDP processes of train_seg failed" in proc.stderr and "train_seg.processes: 1" in proc.stderr
    assert not (project.root / "failed" / "segmenter.pt").exists()


# --------------------------------------------------------------------------- prediction


def test_predictions_have_the_image_size_and_never_the_ignore_label(tmp_path):
    reader = make_dataset(tmp_path / "voc", n_val=3, size=(30, 41))
    h5 = write_pseudo_masks(tmp_path / "pm.h5", reader)
    _train(tmp_path, "seg", tiny_cfg(iterations=2), reader, h5)
    model, _ = load_segmenter(tmp_path / "seg" / "segmenter.pt")
    image = reader.load_image(reader.ids("val")[0])
    probs = predict_seg.predict_probs(model, image, [0.5, 1.0, 1.5], True, torch.device("cpu"))
    assert probs.shape == (4, 30, 41)
    torch.testing.assert_close(probs.sum(0), torch.ones(30, 41))
    labels = predict_seg.label_map(probs)
    assert labels.dtype == np.uint8 and labels.shape == (30, 41) and labels.max() <= 3
    # the flip view is flipped back: a mirrored image gives a mirrored probability map
    mirrored = predict_seg.predict_probs(model, image[:, ::-1], [1.0], True, torch.device("cpu"))
    torch.testing.assert_close(mirrored, predict_seg.predict_probs(model, image, [1.0], True,
                                                                   torch.device("cpu")).flip(-1))

    cfg = build(PredictSegConfig, {"scales": [0.75, 1.0], "crf": True, "threads": 1, "report_images": 2},
                "predict_seg")
    result = predict_seg.run(cfg, reader=reader, segmenter=tmp_path / "seg" / "segmenter.pt",
                             out_dir=tmp_path / "pred", state_dir=tmp_path / "pred_state",
                             manifest=tmp_path / "none.json", progress=False)
    assert result["images"] == 3 and result["timing"]["predicted_this_run"] == 3
    preds = PngMasks(tmp_path / "pred" / "masks")
    assert sorted(preds.ids) == sorted(reader.ids("val"))
    for image_id in preds.ids:
        m = preds.mask(image_id)
        assert m.shape == (30, 41) and m.max() <= 3 and IGNORE not in m
    assert (tmp_path / "pred" / "report.png").is_file()
    assert not (tmp_path / "pred_state").exists() or not any((tmp_path / "pred_state").iterdir())

    # the existing evaluate scores the predictions: mIoU and a per-class table over C + 1 labels
    from core.config import EvaluateConfig
    from tasks.evaluate import evaluate
    ecfg = build(EvaluateConfig, {"splits": ["val"], "workers": 1, "report_images": 1}, "evaluate")
    metrics = evaluate(ecfg, reader, tmp_path / "pred" / "masks", out_dir=tmp_path / "eval",
                       metrics_path=tmp_path / "eval.json", splits=["val"], progress=False)
    assert metrics["images"] == 3 and 0.0 <= metrics["miou"] <= 1.0
    assert list(metrics["per_class_iou"]) == ["background", *CLASSES]
    assert len((tmp_path / "eval" / "per_class.csv").read_text().splitlines()) == 1 + 4


def test_prediction_resumes_and_rejects_a_segmenter_of_other_classes(tmp_path):
    reader = make_dataset(tmp_path / "voc", n_val=3)
    h5 = write_pseudo_masks(tmp_path / "pm.h5", reader)
    _train(tmp_path, "seg", tiny_cfg(iterations=1), reader, h5)
    cfg = build(PredictSegConfig, {"scales": [1.0], "flip": False, "threads": 1, "report_images": 0,
                                   "precision": "fp32"}, "predict_seg")   # compared with predict_probs in fp32
    seg = tmp_path / "seg" / "segmenter.pt"
    # a previous run was killed after one image: its mask is kept, the rest is predicted
    _, meta = load_segmenter(seg)
    ids = reader.ids("val")
    fp = predict_seg.fingerprint(cfg, meta["sha256"], ids, tmp_path / "none.json")
    partial = tmp_path / "pred_state" / fp / "masks"
    partial.mkdir(parents=True)
    from dataio.label_png import save_mask_png
    save_mask_png(np.zeros((32, 32), np.uint8), partial / f"{ids[0]}.png", palette=False)
    result = predict_seg.run(cfg, reader=reader, segmenter=seg, out_dir=tmp_path / "pred",
                             state_dir=tmp_path / "pred_state", manifest=tmp_path / "none.json", progress=False)
    assert result["timing"]["predicted_this_run"] == 2 and len(PngMasks(tmp_path / "pred" / "masks")) == 3

    other = make_dataset(tmp_path / "voc2", n_val=2)
    other.class_names = ["x", "y", "z"]
    with pytest.raises(predict_seg.PredictSegError, match="segmenter.pt was trained for classes"):
        predict_seg.run(cfg, reader=other, segmenter=seg, out_dir=tmp_path / "pred2",
                        state_dir=tmp_path / "pred2_state", progress=False)


# --------------------------------------------------------------------------- it learns; prediction


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A segmenter trained for 60 iterations on ColourBlocks (one square per image) from an HDF5 file of
    its true masks: ``(reader, segmenter path, summary)``."""
    tmp = tmp_path_factory.mktemp("learned")
    reader = ColourBlocks(num_train=8, num_val=8, block=(14, 20), max_objects=1)
    h5 = tmp / "pm.h5"
    with PseudoMaskWriter(h5, reader.class_names, {"method": "test"}) as w:
        for image_id in reader.ids("train"):
            w.add(image_id, reader.load_mask(image_id))
    cfg = tiny_cfg(iterations=60, output_stride=8, lr=5e-4, head_lr_mult=100, checkpoint_every=100, log_every=10)
    summary = _train(tmp, "seg", cfg, reader, h5)
    return reader, tmp / "seg" / "segmenter.pt", summary


def test_segmenter_learns_the_colour_blocks_well_above_all_background(learned):
    reader, _, summary = learned
    gts = [reader.load_mask(i) for i in reader.ids("val")]
    # predicting background everywhere: IoU = background pixels / all pixels (no 255 here), 0 for
    # every class in the ground truth
    classes = set(np.concatenate([g.ravel() for g in gts]).tolist()) - {0}
    all_background = sum(int((g == 0).sum()) for g in gts) / sum(g.size for g in gts) / (1 + len(classes))
    assert len(classes) == 3 and 0.15 < all_background < 0.25
    assert summary["val/mIoU_single_scale"] > all_background + 0.15, (summary["val/mIoU_single_scale"],
                                                                       all_background)


def _predict_cfg(**over) -> PredictSegConfig:
    """The network's own labels (``crf: false``; the default CRF has its own test), compared with
    predict_probs in fp32."""
    return build(PredictSegConfig, {"scales": [1.0], "flip": False, "threads": 1, "report_images": 0,
                                    "precision": "fp32", "crf": False, **over}, "predict_seg")


def _direct_prediction(model, image, scales, flip, crf_params=None) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the stage runs (threads: 1), so the same arithmetic
    try:
        probs = predict_seg.predict_probs(model, image, scales, flip, torch.device("cpu"))
        return predict_seg.label_map(probs, image, crf_params)
    finally:
        torch.set_num_threads(threads)


def test_predict_seg_default_refines_with_deeplabs_crf(learned, tmp_path):
    """The default (``crf: true``, the paper's segmenter): each mask is the argmax of DeepLab's dense CRF
    (the ``paper`` kernels) on the averaged probabilities, and the CRF moves some pixels."""
    from method.crf import CRF_PRESETS

    reader, seg, _ = learned
    model, _ = load_segmenter(seg)
    defaults = build(PredictSegConfig, {}, "predict_seg")
    assert defaults.crf is True and defaults.crf_preset == "paper"
    cfg = build(PredictSegConfig, {"scales": [1.0], "flip": False, "threads": 1, "report_images": 0,
                                   "precision": "fp32"}, "predict_seg")
    predict_seg.run(cfg, reader=reader, segmenter=seg, out_dir=tmp_path / "pred", state_dir=tmp_path / "state",
                    progress=False)
    preds = PngMasks(tmp_path / "pred" / "masks")
    moved = 0
    for image_id in reader.ids("val"):
        image = reader.load_image(image_id)
        expected = _direct_prediction(model, image, [1.0], False, CRF_PRESETS["paper"])
        np.testing.assert_array_equal(preds.mask(image_id), expected)
        moved += int((_direct_prediction(model, image, [1.0], False) != expected).sum())
    assert moved > 0


def test_predict_seg_writes_what_the_segmenter_predicts_at_the_configured_scales(learned, tmp_path):
    reader, seg, _ = learned
    model, meta = load_segmenter(seg)
    cfg = _predict_cfg(scales=[0.75, 1.25], flip=True, report_images=2)
    result = predict_seg.run(cfg, reader=reader, segmenter=seg, out_dir=tmp_path / "pred",
                             state_dir=tmp_path / "state", progress=False)
    preds = PngMasks(tmp_path / "pred" / "masks")
    assert sorted(preds.ids) == reader.ids("val") and result["timing"]["predicted_this_run"] == 8
    changed_by_scales = 0
    for image_id in reader.ids("val"):
        image = reader.load_image(image_id)
        expected = _direct_prediction(model, image, [0.75, 1.25], True)
        mask = preds.mask(image_id)
        assert mask.shape == image.shape[:2] and mask.max() <= reader.num_classes
        np.testing.assert_array_equal(mask, expected)
        changed_by_scales += int((_direct_prediction(model, image, [1.0], False) != expected).sum())
    assert changed_by_scales > 0      # so the equality above shows that scales and flip reach the model
    written = json.loads((tmp_path / "pred" / "meta.json").read_text())
    assert written["split"] == "val" and written["images"] == 8 and written["segmenter_sha256"] == meta["sha256"]
    assert written["predict_seg"]["scales"] == [0.75, 1.25] and written["predict_seg"]["flip"] is True
    assert (tmp_path / "pred" / "report.png").is_file()


def test_predict_seg_split_param_picks_the_images(learned, tmp_path):
    reader, seg, _ = learned
    result = predict_seg.run(_predict_cfg(split="train"), reader=reader, segmenter=seg, out_dir=tmp_path / "pred",
                             state_dir=tmp_path / "state", progress=False)
    assert result["split"] == "train" and result["images"] == 8
    assert sorted(PngMasks(tmp_path / "pred" / "masks").ids) == reader.ids("train")
    assert not (tmp_path / "pred" / "report.png").exists()      # report_images: 0


class _Interrupted(Exception):
    pass


class _StopsAfter:
    """``reader`` whose first image is black and whose load_image raises once ``n`` images were read."""

    def __init__(self, reader, n):
        self.reader, self.n, self.read = reader, n, 0
        self.class_names, self.num_classes = reader.class_names, reader.num_classes
        self.first = reader.ids("val")[0]

    def ids(self, split):
        return self.reader.ids(split)

    def load_mask(self, image_id):
        return self.reader.load_mask(image_id)

    def load_image(self, image_id):
        if self.read == self.n:
            raise _Interrupted(image_id)
        self.read += 1
        image = self.reader.load_image(image_id)
        return np.zeros_like(image) if image_id == self.first else image


def test_predict_seg_resumes_what_an_interrupted_run_left_unless_a_param_changed(learned, tmp_path):
    reader, seg, _ = learned
    model, _ = load_segmenter(seg)
    first = reader.ids("val")[0]
    black = _direct_prediction(model, np.zeros_like(reader.load_image(first)), [1.0], False)
    real = _direct_prediction(model, reader.load_image(first), [1.0], False)
    assert not np.array_equal(black, real)

    def predict(cfg, source, out):
        return predict_seg.run(cfg, reader=source, segmenter=seg, out_dir=tmp_path / out,
                               state_dir=tmp_path / "state", progress=False)

    with pytest.raises(_Interrupted):
        predict(_predict_cfg(), _StopsAfter(reader, 3), "a")       # 3 masks written, the first of a black image
    assert not (tmp_path / "a").exists()
    # other scales: another run, nothing of the interrupted one is used
    other = predict(_predict_cfg(scales=[0.75]), reader, "b")
    assert other["timing"]["predicted_this_run"] == 8
    # the same params again: the 3 masks are kept as they are (the black image's), the 5 others predicted
    resumed = predict(_predict_cfg(), reader, "a")
    assert resumed["timing"]["predicted_this_run"] == 5
    masks = PngMasks(tmp_path / "a" / "masks")
    np.testing.assert_array_equal(masks.mask(first), black)
    last = reader.ids("val")[-1]
    np.testing.assert_array_equal(masks.mask(last), _direct_prediction(model, reader.load_image(last), [1.0], False))
    assert not list((tmp_path / "state").glob("*/masks/*.png"))   # finished runs leave no partial masks


def test_predict_seg_names_the_segmenter_it_cannot_use(learned, tmp_path):
    reader, seg, _ = learned
    other = ColourBlocks(num_train=1, num_val=2)
    other.class_names = ["cat", "dog", "boat"]
    with pytest.raises(predict_seg.PredictSegError,
                       match=re.escape(f"{seg} was trained for classes ['obj0', 'obj1', 'obj2'], the dataset has "
                                       f"['cat', 'dog', 'boat']; rerun train_seg")):
        predict_seg.run(_predict_cfg(), reader=other, segmenter=seg, out_dir=tmp_path / "pred",
                        state_dir=tmp_path / "state", progress=False)
    missing = tmp_path / "nope" / "segmenter.pt"
    with pytest.raises(ValueError, match=re.escape(f"segmenter file not found: {missing}")):
        predict_seg.run(_predict_cfg(), reader=reader, segmenter=missing, out_dir=tmp_path / "pred",
                        state_dir=tmp_path / "state", progress=False)
    assert not (tmp_path / "pred").exists()


def test_predict_seg_then_evaluate_seg_as_dvc_runs_them_on_the_predicted_split(voc_project):
    # predict_seg.split reaches both stages (evaluate_seg gets it as --splits): train has 2 images, val 3
    root = voc_project.root
    train_seg.run(tiny_cfg(mask_source="ground_truth", iterations=1, batch_size=2), seed=0, reader=voc_project.dataset,
                  out_dir=root / "data" / "train_seg", state_dir=root / ".state" / "train_seg", metrics_path=None,
                  manifest=root / "data" / "prepared" / "dataset.json", progress=False)
    voc_project.set_params("predict_seg", split="train", scales=[1.0], flip=False, threads=1, report_images=1)
    voc_project.set_params("evaluate", workers=1, report_images=1)
    assert voc_project.run("predict_seg") == 0
    masks = sorted(p.stem for p in (root / "data" / "predict_seg" / "masks").glob("*.png"))
    assert masks == voc_project.dataset.ids("train")
    assert voc_project.run("evaluate_seg") == 0
    metrics = json.loads((root / "data" / "metrics" / "eval_seg.json").read_text())
    assert metrics["images"] == 2 and 0.0 <= metrics["miou"] <= 1.0
    assert list(metrics["per_class_iou"]) == ["background", *voc_project.dataset.class_names]


# --------------------------------------------------------------------------- the whole DAG
