"""Outputs appear whole or not at all (what DVC may cache)."""

import os

import pytest

from core.atomic import atomic_path, write_text_atomic


def test_exception_leaves_no_file_and_no_temporary(tmp_path):
    final = tmp_path / "out" / "pseudo_masks.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_directory_replaces_previous_only_on_success(tmp_path):
    final = tmp_path / "prepared"
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final, is_dir=True) as tmp:
            (tmp / "a.txt").write_text("second, unfinished")
            raise KeyboardInterrupt
    assert (final / "a.txt").read_text() == "first"
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_outputs_get_umask_modes_not_owner_only(tmp_path):
    write_text_atomic(tmp_path / "m.json", "{}")
    with atomic_path(tmp_path / "d", is_dir=True):
        pass
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
