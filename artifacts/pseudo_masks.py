"""The pseudo-mask HDF5 file and the readers of predicted masks (HDF5 or a PNG folder), VOC PNG export.

Pseudo-mask HDF5 file ``data/pseudo_masks.h5`` (written by ``tasks.export_masks``),
readable with plain h5py::

    /                 attrs: format = "eps-wsss/pseudo-masks", format_version = 1,
                             num_classes (C), method, checkpoint_sha256,
                             scales (JSON list), flip, background, bg_threshold,
                             crf (JSON: preset + kernel values, or "none"), params (JSON of
                             the infer_cam + export_masks sections), split_ids_sha256
    /class_names      (C+1,) str    index = mask value; [0] = "background"
    /palette          (256, 3) uint8  VOC palette (dataio.label_png)
    /ids              (N,) str      image ids in written order
    /masks/<id>       (H, W) uint8  0 background, c+1 class c (chunked, gzip)
    /cams/<id>        (P, H, W) float16, attr "classes" (P,) int16   [optional]
    /bg/<id>          (H, W) float16 background probability          [optional, eps only]

``python -m artifacts.pseudo_masks png data/pseudo_masks.h5 OUT_DIR`` writes ``OUT_DIR/<id>.png``
(palette PNGs, VOC ``SegmentationClass`` style) for other tools; ``info`` prints the metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from artifacts.cams import CamRecord, PseudoMaskError
from dataio.label_png import save_mask_png, voc_palette

FORMAT = "eps-wsss/pseudo-masks"


FORMAT_VERSION = 1


def _check_id(image_id: str) -> str:
    if not image_id or "/" in image_id or image_id in (".", ".."):
        raise PseudoMaskError(f"image id {image_id!r} cannot be an HDF5 name (empty, '.', '..' or "
                              f"containing '/')")
    return image_id


class PseudoMaskWriter:
    """Writes the layout above; use on a temporary path and rename when complete."""

    def __init__(self, path: str | Path, class_names: list[str], attrs: dict,
                 compression: int = 4):
        import h5py

        self.path = Path(path)
        self._f = h5py.File(self.path, "w")
        self._compression = compression
        self._ids: list[str] = []
        str_dt = h5py.string_dtype("utf-8")
        self._str_dt = str_dt
        f = self._f
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_classes"] = len(class_names)
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, (str, int, float, bool, np.integer, np.floating)) \
                else json.dumps(v)
        f.create_dataset("class_names", data=["background", *class_names], dtype=str_dt)
        f.create_dataset("palette", data=voc_palette())
        self._masks = f.create_group("masks")
        self._cams = None
        self._bg = None

    def _chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(min(s, 256) if i >= len(shape) - 2 else 1 for i, s in enumerate(shape))

    def add(self, image_id: str, mask: np.ndarray, cams: np.ndarray | None = None,
            classes: np.ndarray | None = None, bg: np.ndarray | None = None) -> None:
        """Add one image's mask (and optionally its CAMs and background map)."""
        _check_id(image_id)
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != np.uint8:
            raise PseudoMaskError(f"mask of {image_id} must be a (H, W) uint8 array, got "
                                  f"{mask.dtype} {mask.shape}")
        if image_id in self._masks:
            raise PseudoMaskError(f"image id {image_id} written twice")
        self._masks.create_dataset(image_id, data=mask, chunks=self._chunks(mask.shape),
                                   compression="gzip", compression_opts=self._compression)
        if cams is not None:
            if self._cams is None:
                self._cams = self._f.create_group("cams")
            cams = np.asarray(cams, dtype=np.float16)
            opts = {}
            if cams.size:
                opts = dict(chunks=self._chunks(cams.shape), compression="gzip",
                            compression_opts=self._compression, shuffle=True)
            ds = self._cams.create_dataset(image_id, data=cams, **opts)
            ds.attrs["classes"] = np.asarray(classes if classes is not None else [], dtype=np.int16)
        if bg is not None:
            if self._bg is None:
                self._bg = self._f.create_group("bg")
            self._bg.create_dataset(image_id, data=np.asarray(bg, dtype=np.float16),
                                    chunks=self._chunks(bg.shape), compression="gzip",
                                    compression_opts=self._compression, shuffle=True)
        self._ids.append(image_id)

    def set_attr(self, key: str, value) -> None:
        self._f.attrs[key] = value

    def close(self) -> None:
        if self._f:
            self._f.create_dataset("ids", data=self._ids, dtype=self._str_dt)
            self._f.close()
            self._f = None

    def abort(self) -> None:
        if self._f:
            self._f.close()
            self._f = None

    def __enter__(self) -> "PseudoMaskWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class PseudoMasks:
    """Read a pseudo-mask HDF5 file: ``ids``, ``mask(id)``, ``cams(id)``, iterate ``(id, mask)``."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise PseudoMaskError(f"pseudo-mask file not found: {self.path} (run export_masks)")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise PseudoMaskError(f"{self.path} is not a readable HDF5 file ({e})") from e
        if self._f.attrs.get("format") != FORMAT or "ids" not in self._f or "masks" not in self._f:
            self._f.close()
            raise PseudoMaskError(f"{self.path} is not a pseudo-mask file of format {FORMAT}")
        self.ids: list[str] = [s.decode() if isinstance(s, bytes) else str(s)
                               for s in self._f["ids"][()]]
        self.class_names: list[str] = [s.decode() if isinstance(s, bytes) else str(s)
                                       for s in self._f["class_names"][()]]
        self.palette: np.ndarray = self._f["palette"][()]

    @property
    def attrs(self) -> dict:
        """Root attributes, JSON values decoded."""
        out = {}
        for k, v in self._f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    @property
    def has_cams(self) -> bool:
        return "cams" in self._f

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._f["masks"]

    def mask(self, image_id: str) -> np.ndarray:
        if image_id not in self._f["masks"]:
            raise PseudoMaskError(f"{self.path} has no mask for image {image_id}")
        return self._f["masks"][image_id][()]

    def cams(self, image_id: str) -> CamRecord:
        """The stored CAMs of one image (export_masks.store_cams must have been on)."""
        if "cams" not in self._f or image_id not in self._f["cams"]:
            raise PseudoMaskError(f"{self.path} holds no CAMs for image {image_id} "
                                  f"(export with export_masks.store_cams: true)")
        ds = self._f["cams"][image_id]
        cams = ds[()].astype(np.float32)
        bg = self._f["bg"][image_id][()].astype(np.float32) if "bg" in self._f \
            and image_id in self._f["bg"] else None
        size = tuple(self._f["masks"][image_id].shape)
        return CamRecord(cams, ds.attrs["classes"].astype(np.int64), bg, size)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for image_id in self.ids:
            yield image_id, self.mask(image_id)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "PseudoMasks":
        return self

    def __exit__(self, *_) -> None:
        self.close()


class PngMasks:
    """The same reading interface over a folder of ``<id>.png`` label maps (palette or grey)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        if not self.path.is_dir():
            raise PseudoMaskError(f"prediction folder not found: {self.path}")
        self.ids = sorted(p.stem for p in self.path.glob("*.png"))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return (self.path / f"{image_id}.png").is_file()

    def mask(self, image_id: str) -> np.ndarray:
        from PIL import Image

        p = self.path / f"{image_id}.png"
        if not p.is_file():
            raise PseudoMaskError(f"prediction not found: {p}")
        try:
            with Image.open(p) as im:
                if im.mode not in ("P", "L"):
                    raise PseudoMaskError(f"{p} is a {im.mode} image; label PNGs must be palette "
                                          f"(P) or grey (L) with one label value per pixel")
                return np.array(im, dtype=np.uint8)
        except PseudoMaskError:
            raise
        except Exception as e:
            raise PseudoMaskError(f"cannot read label PNG {p}: {e}") from e

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for image_id in self.ids:
            yield image_id, self.mask(image_id)

    def close(self) -> None:
        pass

    def __enter__(self) -> "PngMasks":
        return self

    def __exit__(self, *_) -> None:
        pass


def open_predictions(source: str | Path) -> PseudoMasks | PngMasks:
    """A pseudo-mask/prediction source: an ``.h5`` file or a folder of PNGs."""
    source = Path(source)
    if source.is_dir():
        return PngMasks(source)
    return PseudoMasks(source)


def export_png(h5_path: str | Path, out_dir: str | Path, palette: bool = True) -> int:
    """Write every mask of ``h5_path`` as ``out_dir/<id>.png`` (atomically, as one folder)."""
    from core.atomic import atomic_path

    with PseudoMasks(h5_path) as pm, atomic_path(out_dir, is_dir=True) as tmp:
        for image_id, mask in pm:
            save_mask_png(mask, tmp / f"{image_id}.png", palette=pm.palette if palette else False)
        return len(pm)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m artifacts.pseudo_masks",
                                 description="Inspect a pseudo-mask HDF5 file or export VOC PNGs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_png = sub.add_parser("png", help="write <out_dir>/<id>.png for every mask")
    p_png.add_argument("h5", help="pseudo-mask file, e.g. data/pseudo_masks.h5")
    p_png.add_argument("out_dir")
    p_png.add_argument("--grey", action="store_true", help="8-bit grey PNGs instead of palette")
    p_info = sub.add_parser("info", help="print metadata and counts")
    p_info.add_argument("h5")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "png":
            n = export_png(args.h5, args.out_dir, palette=not args.grey)
            print(f"wrote {n} PNG masks to {args.out_dir}")
        else:
            with PseudoMasks(args.h5) as pm:
                print(json.dumps({"path": str(pm.path), "images": len(pm),
                                  "class_names": pm.class_names, "has_cams": pm.has_cams,
                                  **pm.attrs}, indent=2, default=str))
    except PseudoMaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
