"""The candidate scores ``[background, CAM of each present class]`` of each image exactly as
``export_masks`` built them: the CAMs stored in the pseudo-mask file, its background rule and
threshold (the file's attributes) and, for the saliency rules, the saliency maps. AffinityNet's
sure regions (``train_affinity``) and its random walk (``refine_masks``) start from them, so the
refinement always refines the masks that were exported.

Picklable and fork-safe: the HDF5 file is (re)opened lazily in whichever process reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from artifacts.cams import CamRecord, PseudoMaskError
from method.mask_rule import SALIENCY_MODES, mask_scores


class MaskScores:
    """``scores(id) -> (scores (1+P, H, W) float32, values (1+P,) mask values, record)``."""

    def __init__(self, h5_path: str | Path, saliency_dir: str | Path | None = None):
        from artifacts.pseudo_masks import PseudoMasks

        self.h5_path = Path(h5_path)
        self.saliency_dir = Path(saliency_dir) if saliency_dir else None
        with PseudoMasks(self.h5_path) as pm:
            attrs = pm.attrs
            if not pm.has_cams:
                raise PseudoMaskError(f"{self.h5_path} holds no CAMs; export with export_masks.store_cams: true "
                                      f"(AffinityNet starts from the CAMs)")
            self.ids = list(pm.ids)
            self.class_names = list(pm.class_names)
        self.background = str(attrs.get("background"))
        self.bg_threshold = float(attrs.get("bg_threshold", 0.2))
        if self.background in SALIENCY_MODES and (self.saliency_dir is None or not self.saliency_dir.is_dir()):
            raise PseudoMaskError(f"{self.h5_path} was exported with background: {self.background}, which needs the "
                                  f"saliency maps, but the folder {self.saliency_dir} does not exist; run the "
                                  f"saliency stage")
        self._h5 = None
        self._pid = None

    def _file(self):
        if self._h5 is None or self._pid != os.getpid():
            from artifacts.pseudo_masks import PseudoMasks
            self._h5, self._pid = PseudoMasks(self.h5_path), os.getpid()
        return self._h5

    def size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image's mask, read from the file's header."""
        return tuple(self._file()._f["masks"][image_id].shape)

    def record(self, image_id: str) -> CamRecord:
        return self._file().cams(image_id)

    def scores(self, image_id: str) -> tuple[np.ndarray, np.ndarray, CamRecord]:
        rec = self.record(image_id)
        saliency = None
        if self.background in SALIENCY_MODES:
            from artifacts.saliency_maps import load_saliency
            saliency = load_saliency(self.saliency_dir, image_id, tuple(rec.size))
        scores, values = mask_scores(rec, self.background, self.bg_threshold, saliency)
        return scores, values, rec

    def hash_saliency(self, ids, h, reader: str) -> None:
        """Feed the saliency maps the scores of ``ids`` read (the saliency background rules) into hash ``h``:
        they are part of the data of a stage that uses the scores. A missing map is an error naming it
        and the stage (``reader``) that reads it."""
        if self.background not in SALIENCY_MODES:
            return
        from artifacts.saliency_maps import saliency_path
        for image_id in ids:
            path = saliency_path(self.saliency_dir, image_id)
            if not path.is_file():
                raise PseudoMaskError(f"saliency map {path} is missing ({reader} reads it); run the saliency and "
                                      f"rescue_saliency stages on the train split")
            h.update(path.read_bytes())

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state
