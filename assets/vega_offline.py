"""Offline ``dvc plots show``: an HTML template with vega, vega-lite and vega-embed inlined.

DVC's plot page loads vega from a CDN, so on a machine without internet it renders blank. This
module fetches the three libraries once from the npm registry (``npm pack``, tarballs checked
against the sha256 recorded here), writes ``.state/vega/plots.html`` -- DVC's page with the
minified scripts inlined in place of the CDN tags -- and points this repo's local DVC config at it
(``plots.html_template``; ``.dvc/config.local`` is not committed). ``make assets`` runs it.

    python -m assets.vega_offline            # idempotent
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from assets.npm_pack import NpmPackError, npm_pack
from core.atomic import locked, write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = REPO_ROOT / ".state"


@dataclass(frozen=True)
class Library:
    package: str
    version: str
    tarball_sha256: str   # measured on the registry's tarball
    script: str           # the UMD build inside it


LIBRARIES = (
    Library("vega", "5.33.1", "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3",
            "package/build/vega.min.js"),
    Library("vega-lite", "5.23.0", "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da",
            "package/build/vega-lite.min.js"),
    Library("vega-embed", "6.29.0", "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1",
            "package/build/vega-embed.min.js"),
)

# dvc_render's page, with the scripts inlined instead of its {scripts} CDN tags
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
<!-- %(versions)s, inlined for offline use (assets/vega_offline.py) -->
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


class VegaFetchError(RuntimeError):
    """The vega libraries could not be fetched, verified or inlined; the message says why."""


def template_path(state_dir: str | Path = STATE_DIR) -> Path:
    return Path(state_dir) / "vega" / "plots.html"


def read_script(tarball: Path, lib: Library) -> str:
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != lib.tarball_sha256:
        raise VegaFetchError(f"{tarball}: sha256 {digest}, expected {lib.tarball_sha256} for "
                             f"{lib.package}@{lib.version}; delete it and run `python -m assets.vega_offline`")
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            script = tar.extractfile(lib.script).read().decode("utf-8")  # type: ignore[union-attr]
    except (tarfile.TarError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise VegaFetchError(f"{tarball}: cannot read {lib.script} ({type(e).__name__}: {e})") from None
    if "</script" in script.lower() or any(p in script for p in PLACEHOLDERS):
        raise VegaFetchError(f"{tarball}: {lib.script} cannot be inlined (it holds '</script' or a DVC "
                             "template placeholder)")
    return script


def build_template(state_dir: str | Path = STATE_DIR) -> Path:
    """Write the template (once) and return its path."""
    final = template_path(state_dir)
    versions = ", ".join(f"{lib.package}@{lib.version}" for lib in LIBRARIES)
    with locked(final):
        if final.is_file() and versions in final.read_text(encoding="utf-8", errors="replace")[:1000]:
            return final  # built for these versions (a version bump rebuilds it)
        scripts = []
        for lib in LIBRARIES:
            try:
                tarball = npm_pack(lib.package, lib.version, Path(state_dir) / "downloads",
                                   "python -m assets.vega_offline", timeout_s=600)
            except NpmPackError as e:
                raise VegaFetchError(str(e)) from None
            scripts.append(f"<script>\n{read_script(tarball, lib)}\n</script>")
        write_text_atomic(final, PAGE % {"versions": versions, "scripts": "\n".join(scripts)})
    return final


def configure_dvc(template: Path, repo: Path = REPO_ROOT) -> None:
    """``dvc config --local plots.html_template`` (relative to ``.dvc/``, as DVC resolves it)."""
    try:
        rel = Path("..") / template.resolve().relative_to(repo.resolve())
    except ValueError:  # a state folder outside the repo
        rel = template.resolve()
    proc = subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", str(rel)],
                          cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VegaFetchError(f"`dvc config --local plots.html_template {rel}` failed in {repo}: "
                             f"{(proc.stderr or proc.stdout).strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=str(STATE_DIR), help="cache folder (default: %(default)s)")
    parser.add_argument("--no-config", action="store_true", help="only write the template")
    args = parser.parse_args(argv)
    try:
        path = build_template(args.state_dir)
        if not args.no_config:
            configure_dvc(path)
    except VegaFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"offline DVC plot template ready: {path}" + ("" if args.no_config else " (plots.html_template set)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
