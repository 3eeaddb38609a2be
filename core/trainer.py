"""The training loop every trainer (train_cls, train_seg, ...) runs, so that resume, logging and timings
cannot drift apart between them.

A trainer keeps what differs: its data, its model, a loss step ``step(batch, iteration) -> (loss,
values)`` and an evaluation ``evaluate() -> (metrics, result)``, and what it writes at the end.
:class:`TrainingLoop` owns the rest: the poly learning rate, the optimiser step (with optional
gradient clipping), window means of the step's values over the log interval and over the DDP
processes, dvclive logging, periodic evaluation, the progress bar, ``on_iteration`` and the
run-dependent figures (seconds per iteration, peak memory) that go to :mod:`core.timings`.

Resume. Every ``checkpoint_every`` iterations ``<state_dir>/<fingerprint>/ckpt.pt`` is written
atomically: the trainer's format string, the run fingerprint, weights, optimiser, iteration, the
logged history, the elapsed training time and, for a trainer whose randomness is not reseeded per
iteration (``rng_states``), every process's torch/CUDA/numpy/python RNG states. A rerun of the same
run continues from it with the same random numbers; the history is replayed into dvclive so the
metrics and plots equal an uninterrupted run's. A checkpoint that cannot be read, or of another
run, is an error naming the file: it is never silently overwritten.
"""

from __future__ import annotations

import contextlib
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from core.atomic import save_torch_atomic
from core.timings import write_timings
from core.training import DistContext, cpu_seconds, default_threads, poly_lr, setup_distributed

Step = Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]  # (batch, 0-based iteration) -> loss, values
Evaluate = Callable[[], tuple[dict[str, float] | None, Any]]  # -> metrics to log (or None), result


class LoopParams(Protocol):
    """The params a trainer's section shares with every other trainer's."""

    iterations: int
    lr: float
    poly_power: float
    log_every: int
    eval_every: int
    checkpoint_every: int


@contextlib.contextmanager
def training_process(device: str, threads: int, *, key: str, error: type[Exception]) -> Iterator[DistContext]:
    """This process's place among the DDP processes, with torch threads, deterministic algorithms and
    (on CUDA) cuDNN autotuning set for the run and restored (and a process group this call started destroyed) afterwards."""
    dctx = setup_distributed(device, key=key, error=error)
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    benchmark_before = torch.backends.cudnn.benchmark
    try:
        torch.set_num_threads(threads or default_threads(dctx.local_world_size))
        # CPU kernels are deterministic; on CUDA a few are not and only warn
        torch.use_deterministic_algorithms(True, warn_only=True)
        # fixed-size crops: cuDNN times its (deterministic) convolution algorithms once per shape
        torch.backends.cudnn.benchmark = dctx.device.type == "cuda"
        yield dctx
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)
        torch.backends.cudnn.benchmark = benchmark_before
        if dctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def load_checkpoint(path: Path, fmt: str, fingerprint: str, error: type[Exception] = ValueError) -> dict | None:
    """The checkpoint at ``path`` (None when there is none); unreadable or foreign ones are errors."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: not the remedy here
        reason = (str(e).splitlines() or [""])[0][:120]
        raise error(f"resume checkpoint {path} is unreadable ({type(e).__name__}: {reason}); "
                    f"delete it to start over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt or ckpt.get("fingerprint") != fingerprint:
        raise error(f"resume checkpoint {path} belongs to another run (not format {fmt}, run {fingerprint}); "
                    f"delete it to start over")
    return ckpt


def _rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


class _Live:
    """dvclive on rank 0 (a no-op elsewhere); every log rewrites the summary, so a replayed history
    leaves the same metrics file as the run that logged it."""

    def __init__(self, live_dir: Path | None):
        self.live = None
        if live_dir is not None:
            from core.live_metrics import StageLive
            self.live = StageLive(live_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for k, v in metrics.items():
            self.live.log_metric(k, v)
        self.live.make_summary()

    def end(self, results: dict[str, Any]) -> None:
        """Merge ``results`` (nested dicts key by key) into the summary and close."""
        if self.live is None:
            return

        def merge(into: dict, new: dict) -> None:
            for k, v in new.items():
                if isinstance(v, dict) and isinstance(into.get(k), dict):
                    merge(into[k], v)
                else:
                    into[k] = v

        merge(self.live.summary, results)
        self.live.end()


class TrainingLoop:
    """One run of one trainer: resume, iterate, evaluate, log, checkpoint, finish.

    ``key`` is the params section (named in messages and errors, raised as ``error``);
    ``ckpt_format`` the trainer's checkpoint format string; ``rng_states`` whether the RNG states
    must survive a resume; ``grad_clip`` > 0 clips the gradient norm and logs it as ``train/grad_norm``.
    """

    def __init__(self, key: str, cfg: LoopParams, dctx: DistContext, *, ckpt_format: str, fingerprint: str,
                 state_dir: str | Path, error: type[Exception] = ValueError, rng_states: bool = False,
                 grad_clip: float = 0.0):
        self.key, self.cfg, self.dctx, self.error = key, cfg, dctx, error
        self.ckpt_format, self.fingerprint = ckpt_format, fingerprint
        self.rng_states, self.grad_clip = rng_states, grad_clip
        self.is_main = dctx.rank == 0
        self.ckpt_path = Path(state_dir) / fingerprint / "ckpt.pt"
        self.start, self.history, self.elapsed_before = 0, [], 0.0
        self.done, self.train_time, self.cpu_used = 0, 0.0, 0.0
        self.live = _Live(None)
        self.model: torch.nn.Module | None = None
        self.net: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._evaluate: Evaluate | None = None

    # ------------------------------------------------------------------ resume and checkpoints

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """Resume ``model`` and ``optimizer`` from this run's checkpoint, if any (``start`` says where);
        returns the network to train: ``model``, DDP-wrapped when there are several processes."""
        self.model, self.optimizer = model, optimizer
        ckpt = load_checkpoint(self.ckpt_path, self.ckpt_format, self.fingerprint, self.error)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if self.rng_states:
                _set_rng_state(ckpt["rng"][self.dctx.rank], self.dctx.device)
            self.start, self.history = int(ckpt["iteration"]), list(ckpt["history"])
            self.elapsed_before = float(ckpt["elapsed"])
            if self.is_main:
                print(f"{self.key}: resuming from {self.ckpt_path} at iteration {self.start}/{self.cfg.iterations}",
                      file=sys.stderr)
        self.net = model
        if self.dctx.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.dctx.device.index] if self.dctx.device.type == "cuda" else None)
        return self.net

    def save_checkpoint(self, iteration: int) -> None:
        rngs = None
        if self.rng_states:
            rngs = [_rng_state(self.dctx.device)]
            if self.dctx.world_size > 1:
                mine, rngs = rngs[0], [None] * self.dctx.world_size
                dist.all_gather_object(rngs, mine)
        if self.is_main:
            save_torch_atomic({"format": self.ckpt_format, "fingerprint": self.fingerprint, "iteration": iteration,
                               "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                               "history": self.history, "elapsed": self.elapsed_before + self.train_time,
                               "rng": rngs}, self.ckpt_path)
        self._barrier()

    # ------------------------------------------------------------------ the loop

    def train(self, loader: Iterable, step: Step, evaluate: Evaluate, *, logged: list[str], live_dir: Path,
              on_iteration: Callable[[int], None] | None = None, progress: bool = True, desc: str = "",
              postfix: dict[str, str] | None = None) -> Any:
        """Iterations ``start+1..iterations`` over ``loader`` (one batch each), then the final evaluation;
        returns its result (rank 0; None elsewhere).

        ``logged``: the train metrics in the order they are logged, window means of the step's values
        of those names and ``train/lr`` (the loop's). ``postfix``: short name -> metric, shown in the bar.
        """
        cfg = self.cfg
        self._evaluate, self.live = evaluate, _Live(live_dir if self.is_main else None)
        for row in self.history:
            self.live.log(row["step"], row["metrics"])
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.net.train()
        bar = None
        if progress and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iterations, initial=self.start, desc=desc or self.key, unit="it",
                       dynamic_ncols=True, file=sys.stderr)
        window: dict[str, float] = {}
        window_n = 0
        cpu_start = cpu_seconds()
        t_iter = time.perf_counter()
        it = self.start
        for batch in loader:
            lr = self._set_lr(it)
            loss, values = step(batch, it)
            values = dict(values)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.key}: loss is {loss.item()} at iteration {it + 1}; lower "
                                         f"{self.key}.lr (now {cfg.lr})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:  # logged before clipping
                values["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip).item()
            self.optimizer.step()
            it += 1
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + float(v)
            window_n += 1
            self.train_time += time.perf_counter() - t_iter
            if it % cfg.log_every == 0 or it == cfg.iterations:
                self._log(it, {k: v / window_n for k, v in window.items()}, lr, logged, bar, postfix or {})
                window, window_n = {}, 0
            if cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
                self.evaluate(it)
            if it % cfg.checkpoint_every == 0 and it < cfg.iterations:
                self.save_checkpoint(it)
            if bar is not None:
                bar.update(1)
            if on_iteration is not None:
                on_iteration(it)
            t_iter = time.perf_counter()
        if bar is not None:
            bar.close()
        self.cpu_used = cpu_seconds() - cpu_start  # includes the periodic evaluations and checkpoints
        self.done = it - self.start
        return self.evaluate(cfg.iterations)

    def _set_lr(self, it: int) -> float:
        """Poly rate of iteration ``it`` for every group (from its ``initial_lr``); returns the base rate's."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = poly_lr(group["initial_lr"], it, cfg.iterations, cfg.poly_power)
        return poly_lr(cfg.lr, it, cfg.iterations, cfg.poly_power)

    def _log(self, it: int, means: dict[str, float], lr: float, logged: list[str], bar, postfix: dict[str, str]):
        names = list(means)
        reduced = dict(zip(names, self._mean_over_processes([means[k] for k in names])))
        metrics = {k: lr if k == "train/lr" else reduced[k] for k in logged}
        self.history.append({"step": it, "metrics": metrics})
        self.live.log(it, metrics)
        if bar is not None:
            bar.set_postfix(loss=f"{reduced['train/loss']:.4f}", lr=f"{lr:.2e}",
                            **{short: f"{reduced[k]:.2f}" for short, k in postfix.items()})

    def _mean_over_processes(self, values: list[float]) -> list[float]:
        if self.dctx.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.dctx.device)
        dist.all_reduce(t)
        return (t / self.dctx.world_size).tolist()

    def evaluate(self, step: int) -> Any:
        """The trainer's evaluation on rank 0, its metrics logged at ``step``; the others wait."""
        result = None
        if self.is_main:
            metrics, result = self._evaluate()
            if metrics:
                self.history.append({"step": step, "metrics": metrics})
                self.live.log(step, metrics)
        self._barrier()
        return result

    def _barrier(self) -> None:
        if self.dctx.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ the end

    def finish(self, results: dict[str, Any], *, output: Path, headline: str, timings: str | Path | None,
               perf: dict[str, Any] | None = None) -> dict:
        """After the trainer wrote ``output`` (rank 0): ``results`` join the live summary (a DVC metric:
        results only), the run-dependent figures go to ``timings``, the checkpoint is removed.
        Returns ``results`` with ``perf`` on rank 0, ``{}`` elsewhere."""
        summary: dict[str, Any] = {}
        if self.is_main:
            figures = self._perf() | (perf or {})
            self.live.end(results)
            write_timings(timings, {"perf": figures})
            shutil.rmtree(self.ckpt_path.parent, ignore_errors=True)
            spi = figures["sec_per_iter"]
            print(f"{self.key}: wrote {output}: {headline}" + (f", {spi:.3f} s/iteration" if spi else "")
                  + f", peak memory {figures['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            summary = {**results, "perf": figures}
        self._barrier()
        return summary

    def _perf(self) -> dict[str, Any]:
        done, dctx = self.done, self.dctx
        figures = {"sec_per_iter": (self.train_time / done) if done else None,
                   "cpu_sec_per_iter": (self.cpu_used / done) if done else None,
                   "iterations_this_run": done, "resumed_from": self.start,
                   "train_seconds": self.elapsed_before + self.train_time,
                   "processes": dctx.world_size, "device": str(dctx.device), "threads": torch.get_num_threads(),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if dctx.device.type == "cuda":
            figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dctx.device) / 2**20
        return figures
