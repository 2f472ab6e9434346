"""util.atomic_files: whole-or-absent files, per-process temp names, cleanup of our own leftovers only."""
import os
import subprocess
import sys

import pytest

from util.atomic_files import (remove_stale_temp_files, stale_temp_files, temp_owner, temp_path, write_atomic,
                               write_bytes_atomic)


def test_temp_names_are_ours_unique_and_carry_the_pid(tmp_path):
    p = str(tmp_path / "p 1.png")
    a, b = temp_path(p), temp_path(p)
    assert a != b and os.path.dirname(a) == str(tmp_path)
    assert temp_owner(os.path.basename(a)) == os.getpid()
    for other in (".tmp_mine.txt", ".tmp_other_app.json", "p.png.part", ".d3dfr-x-0123abcd.a.part"):
        assert temp_owner(other) is None


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")

    def boom(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(str(p), boom)
    assert sorted(os.listdir(tmp_path)) == ["out.bin"] and p.read_bytes() == b"old"
    write_bytes_atomic(str(p), [b"new", b"!"])
    assert p.read_bytes() == b"new!" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes_atomic(str(tmp_path / "a"), b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o640


def test_only_our_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = [f".d3dfr-{dead_pid}-0123abcd.p1.png.part",      # ours, writer gone: removed
             f".d3dfr-{os.getpid()}-0123abcd.p2.png.part",   # ours, writer alive (this process): kept
             ".tmp_mine.txt", ".tmp_other_app.json", "p3.png.part", "photo.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert stale_temp_files(str(tmp_path)) == [str(tmp_path / names[0])]
    assert remove_stale_temp_files(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
