"""core.trainer: the loop every trainer runs, checked by hand on a linear model (seconds)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from core.trainer import TrainingLoop, training_process
from core.training import DistContext, ResumableBatchSampler, poly_lr

CPU = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                  owns_group=False)


@dataclasses.dataclass
class Params:
    iterations: int = 6
    lr: float = 0.1
    poly_power: float = 0.9
    log_every: int = 2
    eval_every: int = 4
    checkpoint_every: int = 2


class Rows(Dataset):
    """y = 2 x0 - x1 on 12 fixed points; keys come from ResumableBatchSampler."""

    def __init__(self):
        self.x = torch.linspace(-1, 1, 24).view(12, 2)
        self.y = 2 * self.x[:, 0] - self.x[:, 1]

    def __len__(self):
        return 12

    def __getitem__(self, key):
        index, _ = key
        return self.x[index], self.y[index]


class Stop(Exception):
    pass


def _run(tmp_path, cfg=None, *, name="run", stop_at=None, noise=False, rng_states=False, grad_clip=0.0,
         logged=("train/loss", "train/lr", "train/it")):
    """Train the linear model; returns the loop, its model and what the hooks saw."""
    cfg = cfg or Params()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "lr": cfg.lr, "initial_lr": cfg.lr}],
                                lr=cfg.lr, momentum=0.9)
    loop = TrainingLoop("toy", cfg, CPU, ckpt_format="toy-ckpt/1", fingerprint="f00d", state_dir=tmp_path / "state",
                        rng_states=rng_states, grad_clip=grad_clip)
    net = loop.prepare(model, optimizer)
    sampler = ResumableBatchSampler(12, 4, seed=0, start=loop.start, end=cfg.iterations)
    # its own generator: the loader would otherwise draw its base seed from the restored torch RNG
    loader = DataLoader(Rows(), batch_sampler=sampler, generator=torch.Generator().manual_seed(0))
    seen = {"steps": [], "evals": [], "calls": []}

    def step(batch, it):
        x, y = batch
        if noise:
            x = x + 0.1 * torch.randn_like(x)
        seen["steps"].append(it + 1)
        loss = F.mse_loss(net(x).squeeze(1), y)
        return loss, {"train/loss": loss.item(), "train/it": float(it)}

    def evaluate():
        seen["evals"].append(seen["steps"][-1])
        return {"val/w0": model.weight[0, 0].item()}, "final"

    def on_iteration(i):
        seen["calls"].append(i)
        if i == stop_at:
            raise Stop

    seen["result"] = loop.train(loader, step, evaluate, logged=list(logged),
                                live_dir=tmp_path / name / "live", on_iteration=on_iteration, progress=False)
    return loop, model, seen


def _live_files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_hooks_windows_and_history(tmp_path):
    loop, _, seen = _run(tmp_path)
    assert seen["calls"] == [1, 2, 3, 4, 5, 6] and seen["steps"] == [1, 2, 3, 4, 5, 6]
    assert seen["evals"] == [4, 6] and seen["result"] == "final"     # every 4th, and once at the end
    train_rows = [r for r in loop.history if "train/loss" in r["metrics"]]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["metrics"]["train/it"] for r in train_rows] == [0.5, 2.5, 4.5]   # means over each window
    # the rate of the window's last iteration, and the logged order
    assert [r["metrics"]["train/lr"] for r in train_rows] == [poly_lr(0.1, i, 6, 0.9) for i in (1, 3, 5)]
    assert list(train_rows[0]["metrics"]) == ["train/loss", "train/lr", "train/it"]
    assert [r["step"] for r in loop.history if "val/w0" in r["metrics"]] == [4, 6]
    ckpt = torch.load(loop.ckpt_path, weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["format"] == "toy-ckpt/1" and ckpt["fingerprint"] == "f00d"

    summary = loop.finish({"val": {"score": 1.0}}, output=tmp_path / "model.pt", headline="done",
                          timings=tmp_path / "timings.json", perf={"workers": 0})
    assert summary["val"] == {"score": 1.0} and summary["perf"]["iterations_this_run"] == 6
    assert not loop.ckpt_path.parent.exists()
    perf = json.loads((tmp_path / "timings.json").read_text())["perf"]
    assert perf["workers"] == 0 and perf["resumed_from"] == 0 and perf["sec_per_iter"] > 0
    metrics = json.loads((tmp_path / "run" / "live" / "metrics.json").read_text())
    assert metrics["val"] == {"w0": loop.history[-1]["metrics"]["val/w0"], "score": 1.0} and "perf" not in metrics
    loss = (tmp_path / "run" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in loss[1:]] == ["2", "4", "6"]


@pytest.mark.parametrize("noise", [False, True])
def test_resume_equals_an_uninterrupted_run(tmp_path, noise):
    ref_loop, ref, _ = _run(tmp_path / "ref", noise=noise, rng_states=noise)
    ref_loop.finish({}, output=tmp_path / "ref.pt", headline="", timings=None)
    with pytest.raises(Stop):
        _run(tmp_path / "run", stop_at=5, noise=noise, rng_states=noise)
    loop, resumed, seen = _run(tmp_path / "run", noise=noise, rng_states=noise)
    assert loop.start == 4 and seen["calls"] == [5, 6] and seen["evals"] == [6]
    assert torch.equal(ref.weight, resumed.weight) and torch.equal(ref.bias, resumed.bias)
    loop.finish({}, output=tmp_path / "run.pt", headline="", timings=None)
    # the replayed history leaves the same metrics and plots files
    assert _live_files(tmp_path / "run" / "run" / "live") == _live_files(tmp_path / "ref" / "run" / "live")


def test_random_draws_need_the_saved_rng_states(tmp_path):
    _, ref, _ = _run(tmp_path / "ref", noise=True)
    with pytest.raises(Stop):
        _run(tmp_path / "run", stop_at=5, noise=True)
    _, resumed, _ = _run(tmp_path / "run", noise=True)
    assert not torch.equal(ref.weight, resumed.weight)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "is unreadable"),
    (None, "belongs to another run"),
])
def test_a_bad_checkpoint_is_named_and_never_overwritten(tmp_path, content, message):
    path = tmp_path / "state" / "f00d" / "ckpt.pt"
    path.parent.mkdir(parents=True)
    if content is None:
        torch.save({"format": "toy-ckpt/0", "fingerprint": "f00d"}, path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} .*{message}.*delete it to start over"):
        _run(tmp_path)
    assert path.read_bytes() == before


def test_gradient_clipping_logs_the_norm_before_clipping(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    rows, first = Rows(), [i for i, _ in next(iter(ResumableBatchSampler(12, 4, seed=0, start=0, end=1)))]
    F.mse_loss(model(rows.x[first]).squeeze(1), rows.y[first]).backward()
    norm = torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm().item()
    loop, trained, _ = _run(tmp_path, Params(iterations=1, log_every=1), grad_clip=norm / 10)
    assert list(loop.history[0]["metrics"]) == ["train/loss", "train/lr", "train/it"]   # only what is asked for
    loop, trained, _ = _run(tmp_path / "logged", Params(iterations=1, log_every=1), grad_clip=norm / 10,
                            logged=["train/loss", "train/grad_norm"])
    assert loop.history[0]["metrics"]["train/grad_norm"] == pytest.approx(norm, rel=1e-6)
    moved = torch.cat([(trained.weight - w0).flatten(), trained.bias - b0]).norm().item()
    assert moved == pytest.approx(0.1 * norm / 10, rel=1e-4)          # lr x the clipped norm (first SGD step)


def test_a_non_finite_loss_names_the_iteration(tmp_path):
    loop = TrainingLoop("toy", Params(), CPU, ckpt_format="toy-ckpt/1", fingerprint="f00d", state_dir=tmp_path)
    model = torch.nn.Linear(1, 1)
    loop.prepare(model, torch.optim.SGD([{"params": list(model.parameters()), "lr": 0.1, "initial_lr": 0.1}]))

    def step(batch, it):
        return model(torch.ones(1, 1)).sum() * (float("nan") if it == 2 else 1.0), {"train/loss": 0.0}

    with pytest.raises(FloatingPointError, match="toy: loss is nan at iteration 3; lower toy.lr"):
        loop.train(range(6), step, lambda: (None, None), logged=["train/loss"], live_dir=tmp_path / "live",
                   progress=False)


def test_training_process_restores_threads_and_determinism():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with training_process("cpu", 1, key="toy", error=ValueError) as dctx:
        assert dctx.world_size == 1 and dctx.device.type == "cpu"
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
