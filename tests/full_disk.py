"""A small real disk for the full-disk tests: a tmpfs of a few hundred KB, mounted for one test and unmounted after.

`mounts(tmp_path)`, the generator behind each test file's `small_disk` fixture, gives `mount(size_kb,
read_only=False)`: it mounts one under tmp_path and returns its path, or skips the test, with the reason, where
it cannot be mounted (not root, no mount(8), a container that forbids it); all are unmounted at teardown.
`fill(folder, leave_kb)` takes the free space down to `leave_kb` KB with a file of zeros. `run(prog, *argv)` runs
a console script as a subprocess, as a user would; `one_line` checks it wrote one line on stderr, no traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "pc-encode": "pcmodel.cli",
    "pc-export": "pcmodel.export",
    "pc-train": "training.train",
    "pc-analyze": "training.analysis",
    "pc-study": "training.study",
}


def mounts(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    mounted: list[Path] = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs")
        if shutil.which("mount") is None or shutil.which("umount") is None:
            pytest.skip("needs mount and umount to mount a tmpfs")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in reversed(mounted):
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # busy: detach it all the same


def free_kb(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize // 1024


def fill(folder: Path, leave_kb: int = 0, name: str = "filler") -> Path:
    """Write zeros into folder/name until `leave_kb` KB are free (0: the disk is full)."""
    path = folder / name
    with path.open("ab", buffering=0) as f:
        try:
            for _ in range(max(0, free_kb(folder) - leave_kb)):
                f.write(bytes(1024))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return path


def run(prog: str, *argv: str | os.PathLike[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", SCRIPTS[prog], *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_line(done: subprocess.CompletedProcess[str], prog: str) -> str:
    """The one line the command wrote on stderr (log lines at INFO aside), checked to be one and no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in f" {line}"]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), done.stderr
    return lines[0]
