"""bench/other_generator.py writes a dataset the pipeline reads as ``dataset.kind: voc``: images, masks whose
classes give the image labels, and context maps with their pairs for m_kc."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from dataio.voc import VOCDataset

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "other_generator.py"


def test_the_second_generator_writes_a_voc_layout_with_contexts(tmp_path):
    # its own process: OpenCV's thread pool, once started in the test process, hangs the workers later tests fork
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--size", "64", "--train", "6", "--val", "3"],
                   check=True, capture_output=True, timeout=120)
    ds = VOCDataset(tmp_path)
    assert ds.class_names == ["fish", "kite", "bus", "sheep", "ship", "bird"]
    assert ds.ids("train") == [f"train_{i:04d}" for i in range(6)] and len(ds.ids("val")) == 3
    assert ds.context_names == ["pond", "clouds", "street", "meadow", "harbor", "branch"]
    context_seen = False
    for image_id in ds.ids("train"):
        image, mask, ctx = ds.load_image(image_id), ds.load_mask(image_id), ds.load_context(image_id)
        assert image.shape == (64, 64, 3) and mask.shape == ctx.shape == (64, 64)
        present = np.unique(mask[(mask > 0) & (mask < 255)]) - 1
        assert present.size >= 1
        np.testing.assert_array_equal(np.flatnonzero(ds.labels(image_id)), present)
        context_seen |= bool(ctx.any())
    assert context_seen
