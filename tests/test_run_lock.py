"""Issue 16, run folders: one process per folder (an flock held for the whole run), and config.json /
train_state.pt / model.safetensors written as one commit (a full disk replaces none of them)."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import run
from linvision import checkpoint
from linvision.cli import main
from linvision.engine.run import LOCK_FILE, FolderLock, RunFolder
from linvision.errors import LinvisionError

FAST = ["--model", "test_vrwkv", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--workers", "0",
        "--threads", "1", "--warmup-epochs", "0", "--val-split", "0"]


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture
def holder(tmp_path):
    """Start another process that takes the lock of a folder and keeps it until its stdin closes."""
    procs = []

    def start(folder):
        code = textwrap.dedent(f"""
            import sys
            from linvision.engine.run import FolderLock
            lock = FolderLock({str(folder)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stdin.close()
        p.wait(timeout=60)


def test_second_train_into_a_folder_in_use_is_refused_with_the_holders_pid(tiny_data, tmp_path, capsys, holder):
    out = tmp_path / "run"
    p = holder(out)
    (out / ".model.safetensors.abc.tmp").write_bytes(b"a live process's temporary checkpoint")
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, "train", *FAST, "--data", tiny_data, "--epochs", "1", "--output", out)
    assert rc == 2 and stdout == "" and "Traceback" not in err
    assert err.strip().splitlines() == [f"linvision: error: --output {out} is in use by another linvision process "
                                        f"(PID {p.pid}); wait for it to end or choose another --output"]
    assert snapshot(tmp_path) == before  # its temporary file was not deleted as stale


def test_resume_of_a_folder_in_use_is_refused_and_the_writer_keeps_its_files(tiny_data, tmp_path, capsys, holder):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--data", str(tiny_data), "--epochs", "1", "--output", str(out)]) == 0
    p = holder(out)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc, _, err = run(capsys, "train", "--resume", out, "--epochs", "2", "--workers", "0", "--threads", "1")
    assert rc == 2 and f"--resume {out} is in use by another linvision process (PID {p.pid})" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_lock_is_released_after_a_run_and_on_errors(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--data", str(tiny_data), "--epochs", "1", "--output", str(out)]) == 0
    FolderLock(out).release()  # free again
    assert main(["train", "--resume", str(out), "--epochs", "2", "--workers", "0", "--threads", "1"]) == 0
    # a run refused before any work leaves no folder (and no lock file) behind
    rc, _, err = run(capsys, "train", *FAST, "--data", tiny_data, "--img-size", "30", "--output", tmp_path / "new")
    assert rc == 2 and not (tmp_path / "new").exists()


def test_same_process_second_runfolder_is_refused(tmp_path):
    from linvision.distributed import DistInfo
    di = DistInfo()
    a = RunFolder(tmp_path / "r", None, {}, (), di)
    assert (tmp_path / "r" / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(LinvisionError, match=f"in use by another linvision process \\(PID {os.getpid()}\\)"):
        RunFolder(tmp_path / "r", None, {}, (), di)
    a.close()
    assert not (tmp_path / "r").exists()  # nothing was written: the folder is removed again
    RunFolder(tmp_path / "r", None, {}, (), di).close()


def test_search_takes_the_lock_too(tmp_path, capsys, holder):
    p = holder(tmp_path / "s")
    rc, _, err = run(capsys, "search", "--supernet", tmp_path / "nosuch", "--macs", "1G", "--output", tmp_path / "s")
    assert rc == 2 and f"(PID {p.pid})" in err and len(err.strip().splitlines()) == 1


def test_supernet_train_takes_the_lock_too(tmp_path, capsys, holder):
    p = holder(tmp_path / "sn")
    rc, _, err = run(capsys, "supernet", "train", "--space", "demo", "--epochs", "1", "--output", tmp_path / "sn")
    assert rc == 2 and f"--output {tmp_path / 'sn'} is in use by another linvision process (PID {p.pid})" in err
    assert len(err.strip().splitlines()) == 1


def test_disk_full_during_an_epoch_checkpoint_keeps_config_and_state_in_agreement(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--data", str(tiny_data), "--epochs", "1", "--output", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    real = checkpoint.stage_write
    calls = []

    def full_disk(path, data):
        calls.append(path.name)
        if path.name == "train_state.pt" and len(calls) > 1:  # the weights are staged, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "stage_write", full_disk)
    rc, _, err = run(capsys, "train", "--resume", out, "--epochs", "2", "--workers", "0", "--threads", "1")
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert [x for x in lines if x.startswith("linvision: error:")] == [
        f"linvision: error: No space left on device: {out / 'train_state.pt'} (the disk is full; free space and "
        "--resume)"]
    assert calls[:2] == ["model.safetensors", "train_state.pt"]
    assert snapshot(out) == before  # nothing replaced, no temporary file left
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert json.loads((out / "config.json").read_text())["epoch"] == state["epoch"] == 1
    monkeypatch.setattr(checkpoint, "stage_write", real)
    assert main(["train", "--resume", str(out), "--epochs", "2", "--workers", "0", "--threads", "1"]) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert json.loads((out / "config.json").read_text())["epoch"] == state["epoch"] == 2
