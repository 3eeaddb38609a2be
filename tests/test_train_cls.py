"""train_cls: augmentation, data order, mAP, a tiny run per method, resume after SIGKILL, DDP, every
method param changing a tiny run in the way the equations say, and a classifier that learns."""

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
from conftest import ColourBlocks

from core.config import ConfigError, TrainClsConfig, build, load_params
from core.training import poly_lr
from models.classifier import build_classifier, load_classifier
from tasks.train_cls import AugmentedImages, TrainClsError, average_precision, run

REPO = Path(__file__).resolve().parents[1]


class FakeReader:
    """In-memory stand-in for dataio.dataset.SegDataset: coloured squares on class-specific context
    stripes (co-occurrence), saliency = the squares."""

    def __init__(self, num_train=12, num_val=6, size=40, num_classes=3, seed=0):
        self.class_names = [f"obj{c}" for c in range(num_classes)]
        self.num_classes = num_classes
        self.context_names, self.context_class = [], {}
        rng = np.random.default_rng(seed)
        self._ids = {"train": [f"tr{i:03d}" for i in range(num_train)],
                     "val": [f"va{i:03d}" for i in range(num_val)]}
        self._data = {}
        colours = rng.integers(0, 256, size=(2 * num_classes, 3))
        for image_id in self._ids["train"] + self._ids["val"]:
            img = rng.integers(90, 110, size=(size, size, 3)).astype(np.uint8)
            sal = np.zeros((size, size), np.float32)
            labels = np.zeros(num_classes, np.float32)
            for c in rng.choice(num_classes, size=int(rng.integers(1, 3)), replace=False):
                s = int(rng.integers(size // 5, size // 3))
                y, x = (int(v) for v in rng.integers(0, size - s - 4, size=2))
                img[y + s:y + s + 4, :] = colours[num_classes + c]        # the context stripe
                img[y:y + s, x:x + s] = colours[c]
                sal[y:y + s, x:x + s] = 1.0
                labels[c] = 1.0
            self._data[image_id] = (img, sal, labels)

    def ids(self, split):
        return list(self._ids[split])

    def median_long_side(self, split="train"):
        return float(self._data[self._ids[split][0]][0].shape[1])

    def load_image(self, image_id):
        return self._data[image_id][0].copy()

    def labels(self, image_id):
        return self._data[image_id][2].copy()

    def saliency(self, image_id, hw):
        sal = self._data[image_id][1]
        assert sal.shape == tuple(hw)
        return sal.copy()

    def validate(self, splits):
        for s in splits:
            assert s in self._ids


def tiny_cfg(**over) -> TrainClsConfig:
    base = dict(backbone="efficientnet_lite0", output_stride=16, iterations=4, batch_size=4, crop_size=32,
                resize_long=[28, 44], checkpoint_every=2, log_every=1, threads=1, workers=0, device="cpu")
    base.update(over)
    return build(TrainClsConfig, base, "train_cls")


def _run(tmp_path, cfg, reader=None, **kw):
    reader = reader or FakeReader()
    return run(cfg, seed=3, reader=reader, saliency_fn=reader.saliency, out_dir=tmp_path / "out",
               state_dir=tmp_path / "state", progress=False, **kw)


# --------------------------------------------------------------------------- params


def test_params_yaml_and_voc12_config_load():
    default = load_params(REPO / "params.yaml").train_cls
    assert default.method == "eps" and default.map_selection == "relative"
    voc = load_params(REPO / "configs" / "voc12.yaml")
    c = voc.train_cls
    # the paper's setting (section 4): ResNet38 at output stride 8, crop 448, batch 8, lr 0.01
    # (head 10x), 20k iterations, tau 0.4, lambda 0.5
    assert (c.backbone, c.output_stride, c.crop_size, c.batch_size, c.lr, c.head_lr_mult, c.iterations,
            c.tau, c.lam) == ("resnet38d", 8, 448, 8, 0.01, 10.0, 20000, 0.4, 0.5)
    assert voc.dataset.kind == "voc"
    assert (c.map_selection, c.empty_maps, c.saliency_resize, c.sal_weight) == ("adaptive", "background", "nearest", 1.0)


@pytest.mark.parametrize("over, key", [
    (dict(backbone="resnet38d", output_stride=16, weights_path="x.pth"), "train_cls.output_stride"),
    (dict(backbone="resnet50", pretrained=True, weights_path=""), "train_cls.weights_path"),
    (dict(map_selection="predefined", predefined_background=[]), "train_cls.predefined_background"),
    (dict(resize_long=[200, 100]), "train_cls.resize_long"),
    (dict(color_jitter=[0.3, 0.3]), "train_cls.color_jitter"),
    (dict(method="mil"), "train_cls.method"),
])
def test_bad_train_cls_params_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_cfg(**over)


def test_bad_input_is_reported_before_training(tmp_path):
    reader = FakeReader()
    with pytest.raises(TrainClsError, match="predefined_background.*nope"):
        _run(tmp_path, tiny_cfg(map_selection="predefined", predefined_background=["nope"]), reader)
    with pytest.raises(TrainClsError, match="saliency folder not found"):
        run(tiny_cfg(), reader=reader, saliency_dir=tmp_path / "missing", out_dir=tmp_path / "o",
            state_dir=tmp_path / "s", progress=False)
    with pytest.raises(TrainClsError, match="batch_size"):
        _run(tmp_path, tiny_cfg(batch_size=64), reader)
    assert not (tmp_path / "out" / "classifier.pt").exists()


# --------------------------------------------------------------------------- data


def test_augmentation_moves_image_and_saliency_together():
    reader = FakeReader(size=48)
    cfg = tiny_cfg(crop_size=40, resize_long=[30, 70], color_jitter=[0.0, 0.0, 0.0, 0.0])
    # saliency := the image's red channel, so any geometric mismatch shows
    red = lambda image_id, hw: reader.load_image(image_id)[..., 0].astype(np.float32) / 255.0  # noqa: E731
    ds = AugmentedImages(reader, reader.ids("train"), cfg, red, pad_value=(0.0, 0.0, 0.0))
    for position in range(8):
        sample = ds[(position % len(ds), (0, 0, position))]
        img, sal = sample["image"], sample["saliency"]
        assert img.shape == (3, 40, 40) and sal.shape == (1, 40, 40)
        assert torch.allclose(img[0], sal[0], atol=1.5 / 255)
        again = ds[(position % len(ds), (0, 0, position))]
        assert torch.equal(again["image"], img)   # the sample seed fixes the augmentation


def test_colour_jitter_changes_image_only():
    reader = FakeReader()
    ds = AugmentedImages(reader, reader.ids("train"), tiny_cfg(crop_size=40, resize_long=[40, 40], flip=False),
                         reader.saliency, pad_value=(0.0, 0.0, 0.0))
    sample = ds[(0, (0, 0, 1))]
    assert not torch.allclose(sample["image"], torch.from_numpy(reader.load_image("tr000")).permute(2, 0, 1) / 255.0)
    assert torch.equal(sample["saliency"][0], torch.from_numpy(reader.saliency("tr000", (40, 40))))


def test_average_precision_by_hand_and_poly_lr():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    # positives at ranks 1, 3, 5: precisions 1, 2/3, 3/5
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(average_precision(scores, np.zeros(5)))
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["eps", "cam"])
def test_tiny_training_writes_a_loadable_classifier(tmp_path, method):
    summary = _run(tmp_path, tiny_cfg(method=method))
    model, meta = load_classifier(tmp_path / "out" / "classifier.pt")
    assert meta["method"] == method and meta["num_classes"] == 3 and meta["output_stride"] == 16
    assert meta["class_names"] == ["obj0", "obj1", "obj2"] and len(meta["sha256"]) == 64
    with torch.no_grad():
        maps = model(torch.rand(1, 3, 32, 32))
    assert maps.shape == (1, 4 if method == "eps" else 3, 2, 2)
    metrics = json.loads((tmp_path / "out" / "live" / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["mAP"] <= 1.0 and metrics["val"]["mAP"] == summary["val"]["mAP"]
    assert set(metrics["val"]["AP"]) == {"obj0", "obj1", "obj2"} and summary["perf"]["sec_per_iter"] > 0
    assert "perf" not in metrics                      # a DVC metric: results only (timings: core.timings)
    plots = tmp_path / "out" / "live" / "plots" / "metrics" / "train"
    assert (plots / "loss.tsv").is_file() and (plots / "lr.tsv").is_file()
    assert (plots / "loss_sal.tsv").is_file() == (method == "eps")
    assert len((plots / "loss.tsv").read_text().splitlines()) == 1 + 4
    assert not any((tmp_path / "state").glob("*/ckpt.pt"))   # removed once the classifier exists


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_train_cls import FakeReader, tiny_cfg
from tasks.train_cls import run
reader = FakeReader()
def on_iteration(i):
    if i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
run(tiny_cfg(iterations=6, checkpoint_every=2, head_dropout=0.3), seed=3, reader=reader,
    saliency_fn=reader.saliency, out_dir={out!r}, state_dir={state!r}, progress=False,
    on_iteration=on_iteration)
"""


def _script(tmp_path, name, kill_at, out, state):
    path = tmp_path / name
    path.write_text(_KILL_SCRIPT.format(tests=str(REPO / "tests"), kill_at=kill_at, out=str(out), state=str(state)))
    return [sys.executable, str(path)]


def test_resume_after_kill_gives_identical_weights(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # uninterrupted reference run (in this process; one thread everywhere, so the same arithmetic)
    reader = FakeReader()
    run(tiny_cfg(iterations=6, checkpoint_every=2, head_dropout=0.3), seed=3, reader=reader,
        saliency_fn=reader.saliency, out_dir=tmp_path / "ref", state_dir=tmp_path / "ref_state", progress=False)
    # killed with SIGKILL during iteration 5 (checkpoints at 2 and 4), then rerun
    killed = subprocess.run(_script(tmp_path, "kill.py", 5, tmp_path / "run", tmp_path / "state"),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "classifier.pt").exists()
    ckpts = list((tmp_path / "state").glob("*/ckpt.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=True)["iteration"] == 4
    assert not list((tmp_path / "state").glob("*/.*tmp*"))       # no half-written checkpoint
    resumed = subprocess.run(_script(tmp_path, "resume.py", -1, tmp_path / "run", tmp_path / "state"),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "iteration 4/6" in resumed.stderr
    a = torch.load(tmp_path / "ref" / "classifier.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "classifier.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the same bytes: a resumed run's output is what DVC would cache for an uninterrupted one
    assert (tmp_path / "ref" / "classifier.pt").read_bytes() == (tmp_path / "run" / "classifier.pt").read_bytes()
    # the logged history is complete after the resume
    loss_rows = (tmp_path / "run" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in loss_rows[1:]] == [str(i) for i in range(1, 7)]



def test_an_unreadable_checkpoint_is_an_error_naming_the_file(tmp_path):
    def stop(i):
        if i == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_cfg(), on_iteration=stop)
    [ckpt] = (tmp_path / "state").glob("*/ckpt.pt")
    ckpt.write_bytes(ckpt.read_bytes()[:100])          # e.g. a disk that filled up under another writer
    with pytest.raises(TrainClsError, match=f"resume checkpoint {re.escape(str(ckpt))} is unreadable.*delete it"):
        _run(tmp_path, tiny_cfg())
    assert not (tmp_path / "out" / "classifier.pt").exists()

_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train_cls import FakeReader, tiny_cfg
from tasks.train_cls import run
reader = FakeReader()
summary = run(tiny_cfg(iterations=3, batch_size=4, threads=1), seed=3, reader=reader,
              saliency_fn=reader.saliency, out_dir={out!r}, state_dir={state!r}, progress=False)
if summary:
    print("SUMMARY", json.dumps(summary["perf"]))
"""


def test_torchrun_two_processes_ddp_on_cpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path / "out"),
                                         state=str(tmp_path / "state")))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    perf = json.loads(proc.stdout.split("SUMMARY", 1)[1].strip().splitlines()[0])
    assert perf["processes"] == 2 and perf["iterations_this_run"] == 3
    model, meta = load_classifier(tmp_path / "out" / "classifier.pt")
    assert meta["method"] == "eps"
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def _logged(tmp_path, name):
    rows = (tmp_path / "out" / "live" / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().split()[2:]
    return [float(v) for v in rows[1::2]]


def test_selection_warmup_keeps_classes_out_of_the_background_trap(tmp_path):
    # authors' empty-map rule: at initialisation no class map is confident, so every present class joins
    # the background (share 0) -- unless the first iterations use the naive selection
    _run(tmp_path / "trap", tiny_cfg(iterations=1, empty_maps="background"))
    assert _logged(tmp_path / "trap", "fg_selected") == [0.0]
    _run(tmp_path / "warm", tiny_cfg(iterations=3, checkpoint_every=10, empty_maps="background",
                                     selection_warmup=2))
    assert _logged(tmp_path / "warm", "fg_selected")[:2] == [1.0, 1.0]


def test_sal_weight_scales_the_saliency_loss_in_the_total(tmp_path):
    # L = L_cls + w L_sal at the first iteration (same weights, same batch); w = 0 trains on L_cls alone
    for w in (0.0, 3.0):
        _run(tmp_path / f"w{w}", tiny_cfg(iterations=1, sal_weight=w))
        total, cls, sal = (_logged(tmp_path / f"w{w}", k)[0] for k in ("loss", "loss_cls", "loss_sal"))
        assert sal > 0 and total == pytest.approx(cls + w * sal, rel=1e-5)


@pytest.mark.parametrize("over", [{"loss_stride": 4}, {"saliency_resize": "nearest"}])
def test_loss_options_change_the_saliency_loss(tmp_path, over):
    _run(tmp_path / "base", tiny_cfg(iterations=1))
    _run(tmp_path / "alt", tiny_cfg(iterations=1, **over))
    assert _logged(tmp_path / "alt", "loss_sal") != pytest.approx(_logged(tmp_path / "base", "loss_sal"), rel=1e-6)


# --------------------------------------------------------------------------- the method params are wired


class SameLabels:
    """Random images that all carry the same labels: with a constant saliency map the outcome of the map
    selection follows from the equations without knowing the maps."""

    def __init__(self, labels, num_train=8, num_val=2, size=32, seed=0):
        self.num_classes = len(labels)
        self.class_names = [f"obj{c}" for c in range(self.num_classes)]
        self._labels = np.asarray(labels, np.float32)
        self._ids = {"train": [f"tr{i:03d}" for i in range(num_train)], "val": [f"va{i:03d}" for i in range(num_val)]}
        rng = np.random.default_rng(seed)
        self._images = {i: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                        for split in self._ids.values() for i in split}

    def ids(self, split):
        return list(self._ids[split])

    def median_long_side(self, split="train"):
        return float(max(self._images[self._ids[split][0]].shape[:2]))

    def load_image(self, image_id):
        return self._images[image_id].copy()

    def labels(self, image_id):
        return self._labels.copy()


def _constant_saliency_run(tmp_path, name, labels, saliency, iterations, **over) -> dict[str, list[float]]:
    """A tiny EPS run on ``SameLabels(labels)`` with saliency ``saliency`` everywhere; the logged
    ``loss_sal`` and ``fg_selected`` per iteration. 32-px images, crops and rescale: no padding, so the
    saliency stays constant in every crop."""
    reader = SameLabels(labels)
    cfg = tiny_cfg(iterations=iterations, crop_size=32, resize_long=[32, 32], checkpoint_every=100, **over)
    run(cfg, seed=3, reader=reader, saliency_fn=lambda image_id, hw: np.full(hw, saliency, np.float32),
        out_dir=tmp_path / name / "out", state_dir=tmp_path / name / "state", progress=False)
    return {k: _logged(tmp_path / name, k) for k in ("loss_sal", "fg_selected")}


def test_tau_decides_whether_a_map_inside_the_saliency_joins_the_foreground(tmp_path):
    # one class, present everywhere, saliency 1 everywhere: a map with a pixel > 0.5 has overlap ratio
    # exactly 1 (two maps: P_class > 0.5 wherever its logit beats the background's, as it does somewhere
    # from the start and everywhere once L_cls has raised it); an empty one goes to the background
    kept = _constant_saliency_run(tmp_path, "tau04", [1.0], 1.0, 3, tau=0.4, empty_maps="background")
    never = _constant_saliency_run(tmp_path, "tau1", [1.0], 1.0, 3, tau=1.0, empty_maps="background")
    # tau = 1: no ratio exceeds 1, the class is always in M_bg = P_class + P_bg = 1, so M_hat = 0, L_sal = 1
    assert never["fg_selected"] == [0.0, 0.0, 0.0]
    assert never["loss_sal"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    # tau = 0.4: a confident map is foreground; then M_hat = P_class > 0 and L_sal = mean (1 - P_class)^2 < 1
    assert max(kept["fg_selected"]) > 0.0
    for share, loss in zip(kept["fg_selected"], kept["loss_sal"]):
        assert (loss < 1.0 - 1e-4) if share > 0 else loss == pytest.approx(1.0, abs=1e-5)


def test_lam_enters_m_hat_linearly(tmp_path):
    # classes 0, 1 present, 2 absent, saliency 0, naive selection: M_fg = P0 + P1, M_bg = P_bg, so
    # M_hat = lam (P0 + P1) + (1 - lam)(P0 + P1 + P2) = P0 + P1 + (1 - lam) P2 and, at iteration 1 (the same
    # weights in every run), L_sal = mean M_hat^2 is a quadratic in lam that falls as lam grows
    lams = [0.0, 1 / 3, 2 / 3, 1.0]
    loss = [_constant_saliency_run(tmp_path, f"lam{k}", [1.0, 1.0, 0.0], 0.0, 1, lam=lam,
                                   map_selection="naive")["loss_sal"][0] for k, lam in enumerate(lams)]
    assert loss[0] > loss[1] > loss[2] > loss[3]
    # equal steps of lam: constant second differences (the mean over pixels of a quadratic in lam)
    assert loss[0] - 2 * loss[1] + loss[2] == pytest.approx(loss[1] - 2 * loss[2] + loss[3], abs=1e-6)
    assert loss[0] - 2 * loss[1] + loss[2] > 0


def test_map_selection_puts_the_expected_share_of_present_classes_in_the_foreground(tmp_path):
    # classes 0, 1 present, saliency 0: adaptive finds no overlap (B_s is empty) and an empty map goes to
    # the background (empty_maps), naive takes both, predefined keeps obj0 in the background
    def share(**over):
        name = "-".join(f"{v}" for v in over.values())
        return _constant_saliency_run(tmp_path, name, [1.0, 1.0, 0.0], 0.0, 2, empty_maps="background",
                                      **over)["fg_selected"]

    assert share(map_selection="adaptive") == [0.0, 0.0]
    assert share(map_selection="naive") == [1.0, 1.0]
    assert share(map_selection="predefined", predefined_background=["obj0"]) == [0.5, 0.5]


def test_empty_maps_decides_where_a_map_without_a_confident_pixel_goes(tmp_path):
    # at initialisation no class map has a pixel > 0.5 (4 maps with near-zero logits: P ~ 0.25 each), so
    # at iteration 1 both present classes follow empty_maps; saliency 0 gives a non-empty map ratio 0
    bg = _constant_saliency_run(tmp_path, "bg", [1.0, 1.0, 0.0], 0.0, 1, empty_maps="background")
    fg = _constant_saliency_run(tmp_path, "fg", [1.0, 1.0, 0.0], 0.0, 1, empty_maps="foreground")
    assert bg["fg_selected"] == [0.0] and fg["fg_selected"] == [1.0]
    assert bg["loss_sal"] != pytest.approx(fg["loss_sal"], rel=1e-4)


def _batchnorms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for key in ("running_mean", "running_var", "weight", "bias"):
                out[f"{name}.{key}"] = getattr(m, key).detach()
    return out


def test_freeze_bn_keeps_the_pretrained_batchnorm_and_unfrozen_bn_moves_it(tmp_path):
    pretrained = _batchnorms(build_classifier("eps", "efficientnet_lite0", 3, output_stride=16, pretrained=True))
    assert len(pretrained) > 40
    trained = {}
    for freeze in (True, False):
        _run(tmp_path / str(freeze), tiny_cfg(iterations=2, freeze_bn=freeze, checkpoint_every=10))
        trained[freeze] = _batchnorms(load_classifier(tmp_path / str(freeze) / "out" / "classifier.pt")[0])
        assert trained[freeze].keys() == pretrained.keys()
    assert all(torch.equal(trained[True][k], v) for k, v in pretrained.items())
    moved = {k for k, v in pretrained.items() if not torch.equal(trained[False][k], v)}
    # batch statistics update the running averages; the affine parameters are trained
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("running_var") for k in moved)
    assert any(k.endswith(".weight") for k in moved) and any(k.endswith(".bias") for k in moved)


# --------------------------------------------------------------------------- it learns


def test_classifier_learns_the_colour_blocks_well_above_chance(tmp_path):
    reader = ColourBlocks()
    cfg = tiny_cfg(iterations=40, lr=0.003, crop_size=32, resize_long=[28, 36], color_jitter=[0.0, 0.0, 0.0, 0.0],
                   checkpoint_every=100, log_every=10)
    summary = run(cfg, seed=3, reader=reader, saliency_fn=reader.saliency, out_dir=tmp_path / "out",
                  state_dir=tmp_path / "state", progress=False)
    # chance: the mAP of random scores on this val set (mean over 1000 draws)
    targets = np.stack([reader.labels(i) for i in reader.ids("val")])
    rng = np.random.default_rng(0)
    chance = np.mean([np.nanmean([average_precision(rng.random(len(targets)), targets[:, c])
                                  for c in range(reader.num_classes)]) for _ in range(1000)])
    assert 0.4 < chance < 0.7
    assert summary["val"]["mAP"] > chance + 0.25, (summary["val"], chance)
