"""core.training: the data order and run identity that exact resume rests on."""

import numpy as np
import pytest
import torch

from core.training import (
    ResumableBatchSampler,
    epoch_permutation,
    poly_lr,
    run_fingerprint,
    sample_rng,
    setup_distributed,
)


def test_data_order_is_a_function_of_seed_and_iteration():
    n, batch = 10, 4
    full = list(ResumableBatchSampler(n, batch, seed=1, start=0, end=6))
    assert len(full) == 6 and all(len(b) == batch for b in full)
    per_epoch = n // batch
    first_epoch = [i for b in full[:per_epoch] for i, _ in b]
    assert len(set(first_epoch)) == len(first_epoch)               # no repeats inside an epoch
    assert first_epoch == list(epoch_permutation(1, 0, 0, n)[:per_epoch * batch])
    assert list(ResumableBatchSampler(n, batch, seed=1, start=3, end=6)) == full[3:]   # resume mid-run
    assert list(ResumableBatchSampler(n, batch, seed=2, start=0, end=6)) != full
    ranks = [list(ResumableBatchSampler(n, batch, 1, 0, 6, rank=r, world_size=2)) for r in (0, 1)]
    for it in range(6):                                          # ranks split the global batch
        assert ranks[0][it] + ranks[1][it] == full[it]


def test_stages_draw_from_separate_streams():
    a = list(ResumableBatchSampler(50, 5, seed=0, start=0, end=4, stream=0))
    b = list(ResumableBatchSampler(50, 5, seed=0, start=0, end=4, stream=10))
    assert a != b
    assert sample_rng(0, 0, 1, 2).random() == sample_rng(0, 0, 1, 2).random()
    assert sample_rng(0, 0, 1, 2).random() != sample_rng(0, 10, 1, 2).random()


class StageError(ValueError):
    pass


def test_bad_batch_errors_name_the_stage_key():
    with pytest.raises(StageError, match=r"'train_seg.batch_size' \(3\) must be divisible by the number of processes \(2\)"):
        ResumableBatchSampler(10, 3, seed=0, start=0, end=1, world_size=2, key="train_seg", error=StageError)
    with pytest.raises(StageError, match=r"'train_cls.batch_size' \(12\) exceeds the number of training images \(10\)"):
        ResumableBatchSampler(10, 12, seed=0, start=0, end=1, key="train_cls", error=StageError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(StageError, match="'train_cls.device' is cuda"):
        setup_distributed("cuda", key="train_cls", error=StageError)
    ctx = setup_distributed("auto", key="train_cls", error=StageError)
    assert ctx.device.type == "cpu" and ctx.world_size == 1 and ctx.rank == 0 and not ctx.owns_group


def test_poly_lr_and_run_identity():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    base = run_fingerprint("train_cls", {"lr": 0.1}, 0, 1, "data", "code")
    assert base == run_fingerprint("train_cls", {"lr": 0.1}, 0, 1, "data", "code")
    others = {run_fingerprint("train_cls", {"lr": 0.2}, 0, 1, "data", "code"),
              run_fingerprint("train_cls", {"lr": 0.1}, 1, 1, "data", "code"),
              run_fingerprint("train_cls", {"lr": 0.1}, 0, 2, "data", "code"),
              run_fingerprint("train_cls", {"lr": 0.1}, 0, 1, "data2", "code"),
              run_fingerprint("train_cls", {"lr": 0.1}, 0, 1, "data", "code2")}
    assert base not in others and len(others) == 5
    assert np.all(np.sort(epoch_permutation(3, 0, 2, 7)) == np.arange(7))
