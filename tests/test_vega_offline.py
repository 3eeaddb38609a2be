"""Offline `dvc plots show`: the template inlines vega and DVC's page then loads nothing from the web."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import missing_asset

from assets import vega_offline
from assets.vega_offline import LIBRARIES, VegaFetchError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template() -> Path:
    """The template `make assets` built (built here from the npm registry if it is missing)."""
    try:
        return vega_offline.build_template()
    except VegaFetchError as e:
        missing_asset("the offline vega template (npm: vega, vega-lite, vega-embed)", e)


def test_template_inlines_all_three_libraries_and_keeps_dvc_placeholders(template):
    page = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{refresh_tag}" in page
    assert "{scripts}" not in page  # DVC would put its CDN tags there
    assert not re.search(r"<script[^>]+src=", page)
    assert page.count("<script>") == len(LIBRARIES)
    for marker in (".vegaEmbed=", ".vegaLite=", ".vega="):
        assert marker in page.replace(" ", ""), marker


def test_dvc_plots_show_writes_a_page_without_remote_scripts(template, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "loss.tsv").write_text("step\tloss\n0\t1.0\n1\t0.5\n2\t0.25\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(dvc + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(dvc + ["config", "core.analytics", "false"], cwd=repo, check=True)
    subprocess.run(dvc + ["config", "--local", "plots.html_template", str(template)], cwd=repo, check=True)
    subprocess.run(dvc + ["plots", "show", "loss.tsv", "-o", "out"], cwd=repo, check=True,
                   capture_output=True)
    page = (repo / "out" / "index.html").read_text(encoding="utf-8")
    assert "vegaEmbed('#loss_tsv'" in page
    assert '"step": 2, "loss": "0.25"' in page  # the data is embedded in the page
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)


def test_a_tarball_with_another_digest_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"window.vega = {};"
        info = tarfile.TarInfo(LIBRARIES[0].script)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fake = tmp_path / "vega-5.33.1.tgz"
    fake.write_bytes(buf.getvalue())
    with pytest.raises(VegaFetchError, match="sha256"):
        vega_offline.read_script(fake, LIBRARIES[0])


def test_a_template_for_other_versions_is_rebuilt(template, tmp_path):
    (tmp_path / "downloads").symlink_to(REPO / ".state" / "downloads")  # the tarballs `make assets` fetched
    stale = vega_offline.template_path(tmp_path)
    stale.parent.mkdir(parents=True)
    stale.write_text("<!-- vega@5.0.0 -->{plot_divs}")
    assert vega_offline.build_template(tmp_path) == stale
    assert stale.read_bytes() == template.read_bytes()
