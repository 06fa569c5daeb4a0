"""Nothing half-written: `crosslayer convert` killed (SIGKILL) at any moment of its write leaves OUT absent
or complete, and a disk that fills leaves nothing at OUT and says so in one line (exit 2)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from crosslayer.__main__ import main

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERT = ["--cla-factor", "2", "--kv-init", "mean", "--no-progress"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A saved tiny random Llama whose weights (8 MB) take a while to write, so a kill can land inside."""
    config = LlamaConfig(vocab_size=8000, hidden_size=128, intermediate_size=224, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("src") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, src):
    """The same conversion, uninterrupted, to a folder of the same name (the card names it)."""
    out = tmp_path_factory.mktemp("ref") / "cla2"
    assert main(["convert", str(src), "--out", str(out), *CONVERT]) == 0
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def staging(parent: Path, name: str) -> list[Path]:
    return list(parent.glob(f".{name}.*.partial"))


# a conversion that SIGKILLs itself at its final rename of the staging folder to OUT: just before, or just after
SELF_KILL = """
import os, signal, sys
from pathlib import Path
from crosslayer.__main__ import main

when, out, rename = sys.argv[1], Path(sys.argv[sys.argv.index("--out") + 1]).resolve(), os.rename

def dying_rename(a, b):
    if Path(b).resolve() == out and when == "before rename":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(a, b)
    if Path(b).resolve() == out and when == "after rename":
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = dying_rename
sys.exit(main(sys.argv[2:]))
"""


def kill_during_write(src: Path, out: Path, moment: str) -> tuple[int, Path | None]:
    """Run the conversion in a fresh process and SIGKILL it at `moment`: as soon as its staging folder exists
    ("staging") or holds a file ("config.json", "model.safetensors": polled), or at the rename (it kills
    itself). Returns its exit status and its staging folder (None if the kill came too late)."""
    argv = ["convert", str(src), "--out", str(out), *CONVERT]
    hook = moment.endswith("rename")
    cmd = [sys.executable, "-c", SELF_KILL, moment, *argv] if hook else [sys.executable, "-m", "crosslayer", *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in, deadline = None, time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            found = staging(out.parent, out.name)
            if not found:
                time.sleep(0.001)  # the import takes seconds; the write milliseconds, polled without a pause
                continue
            killed_in = found[0]
            if not hook and (moment == "staging" or (found[0] / moment).exists()):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
    return proc.returncode, killed_in


# save_pretrained writes config.json first and the weights last; convert then adds plan.json and README.md and
# renames the staging folder to OUT
@pytest.mark.parametrize("moment", ["staging", "config.json", "model.safetensors", "before rename", "after rename"])
def test_sigkill_during_the_write_leaves_out_absent_or_complete(tmp_path, src, reference, moment):
    out = tmp_path / "cla2"
    for _ in range(3):  # a polled kill can come too late on a busy machine: then the conversion is whole; again
        code, killed_in = kill_during_write(src, out, moment)
        if code != 0:
            break
        assert files(out) == files(reference) and staging(tmp_path, "cla2") == []
        shutil.rmtree(out)
    assert code == -signal.SIGKILL, f"the kill at {moment} never landed (exit {code})"
    if moment.endswith("rename"):  # a polled kill may land a little late; these land where they say
        assert out.exists() == (moment == "after rename")
    if out.exists():  # renamed before the kill landed: then it is the whole conversion
        assert files(out) == files(reference) and staging(tmp_path, "cla2") == []
    else:
        assert staging(tmp_path, "cla2") == [killed_in] and killed_in.parent == out.parent
        assert killed_in.stat().st_dev == tmp_path.stat().st_dev  # one filesystem: the rename is atomic
        # the next conversion to OUT removes the dead process's staging folder and writes OUT whole
        assert main(["convert", str(src), "--out", str(out), *CONVERT]) == 0
        assert files(out) == files(reference)
    assert [p.name for p in tmp_path.iterdir()] == ["cla2"]


def test_staging_folders_of_running_processes_are_left_alone(tmp_path, src, reference):
    import socket

    alive = tmp_path / f".cla2.{os.getppid()}@{socket.gethostname()}.abc123.partial"  # our parent runs
    other_host = tmp_path / f".cla2.{2**22 + 17}@elsewhere.abc123.partial"
    for folder in (alive, other_host):
        folder.mkdir()
    assert main(["convert", str(src), "--out", str(tmp_path / "cla2"), *CONVERT]) == 0
    assert alive.is_dir() and other_host.is_dir() and files(tmp_path / "cla2") == files(reference)


def check_disk_full(capsys, parent: Path) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"crosslayer convert: error: cannot write {parent / 'cla2'}: ")
    assert "No space left on device" in lines[0] and lines[0].endswith("nothing was written there")
    assert list(parent.iterdir()) == []  # no OUT, no staging folder


def test_disk_full_in_a_small_tmpfs_is_one_line_and_nothing_at_out(tmp_path, src, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        assert main(["convert", str(src), "--out", str(disk / "cla2"), *CONVERT]) == 2  # 8 MB of weights
        check_disk_full(capsys, disk)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_while_writing_weights_is_one_line_and_nothing_at_out(tmp_path, src, capsys, monkeypatch):
    from crosslayer.weights import SafetensorsWriter

    write = SafetensorsWriter.write

    def full_disk(self, name, tensor):  # the disk fills once the weights are half written
        if len(self._pending) <= len(self.layout) // 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder))
        write(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", full_disk)
    parent = tmp_path / "outs"
    parent.mkdir()
    assert main(["convert", str(src), "--out", str(parent / "cla2"), *CONVERT]) == 2
    check_disk_full(capsys, parent)
