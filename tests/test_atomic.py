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


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys
    final = tmp_path / "out.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()           # a pid that no longer runs
    stale_file = tmp_path / f".out.h5.tmp-{dead}-abc.h5"
    stale_dir = tmp_path / f".out.h5.tmp-{dead}-xyz"
    stale_file.write_text("half")
    stale_dir.mkdir()
    live = tmp_path / f".out.h5.tmp-{os.getpid()}-mine.h5"                # this process: never touched
    live.write_text("mine")
    other = tmp_path / ".other.h5.tmp-1-abc"                              # another output: not ours
    other.write_text("x")
    write_text_atomic(final, "done")
    assert final.read_text() == "done"
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()


def test_torch_files_do_not_depend_on_the_temporary_name(tmp_path):
    import torch

    from core.atomic import save_torch_atomic
    obj = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"a": 1}}
    save_torch_atomic(obj, tmp_path / "a" / "model.pt")
    save_torch_atomic(obj, tmp_path / "b" / "model.pt")                  # another temp name each time
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a" / "model.pt", weights_only=True)["w"], obj["w"])
