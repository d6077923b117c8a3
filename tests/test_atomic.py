"""multitune/atomic.py: outputs appear whole or not at all, with ordinary permissions, and leave nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from multitune.atomic import atomic_dir, atomic_file, write_atomic

pytestmark = pytest.mark.unit


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert _entries(final) == ["old.txt"] and _entries(tmp_path) == ["adapter"]  # untouched, no leftovers
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and not final.samefile(tmp)
        (tmp / "new.txt").write_text("new")
    assert _entries(final) == ["new.txt"] and _entries(tmp_path) == ["adapter"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_a_cache_entry_finished_by_another_process_is_kept(tmp_path):
    final = tmp_path / "gguf-abc"
    with atomic_dir(final, keep_existing=lambda done: (done / "done").is_file()) as tmp:
        (tmp / "mine").write_text("")
        final.mkdir()  # another process renames its complete copy into place meanwhile
        (final / "done").write_text("")
    assert _entries(final) == ["done"] and _entries(tmp_path) == ["gguf-abc"]
    stale = tmp_path / "stale"  # an incomplete folder under the name is replaced
    stale.mkdir()
    with atomic_dir(stale, keep_existing=lambda done: (done / "done").is_file()) as tmp:
        (tmp / "done").write_text("")
    assert _entries(stale) == ["done"]


def test_a_file_keeps_its_suffix_while_written_and_ordinary_permissions(tmp_path):
    final = tmp_path / "plot.png"
    with atomic_file(final) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
    assert final.read_bytes() == b"png" and _entries(tmp_path) == ["plot.png"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o666 & ~_umask()
    with pytest.raises(ValueError), atomic_file(final) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert final.read_bytes() == b"png" and _entries(tmp_path) == ["plot.png"]
    write_atomic(tmp_path / "metrics.json", "{\"ä\": 1}")
    assert (tmp_path / "metrics.json").read_text(encoding="utf-8") == "{\"ä\": 1}"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
