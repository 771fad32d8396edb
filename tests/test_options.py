"""Issue 16: every numeric option of every command is range-checked by one helper (linvision.options), and
main() turns OSError / MemoryError into one-line errors (exit 2; --debug keeps the traceback)."""
import argparse
import errno

import pytest

from conftest import run
from linvision import cli
from linvision.cli import build_parser, main
from linvision.options import RULES


def _numeric_actions(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_actions(sub, (*prefix, name))
        elif action.type in (int, float) or getattr(action.type, "__name__", "") == "_int_list":
            yield " ".join(prefix), action.dest


def test_every_numeric_option_of_every_command_has_a_rule():
    found = set(_numeric_actions(build_parser()))
    commands = {c for c, _ in found}
    assert {"train", "eval", "predict", "supernet train", "search", "bench", "export"} <= commands
    assert [(c, d) for c, d in sorted(found) if d not in RULES] == []


@pytest.mark.parametrize("argv,message", [
    (["train", "--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["train", "--img-size", "-32"], "--img-size must be positive (got -32)"),
    (["train", "--seed", "-1"], "--seed must be between 0 and 4294967295 (got -1)"),
    (["train", "--drop-path", "1.5"], "--drop-path must be in [0, 1) (got 1.5)"),
    (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size must be positive (got 0)"),
    (["predict", "--checkpoint", "x", "a.png", "--top-k", "0"], "--top-k must be positive (got 0)"),
    (["supernet", "train", "--epochs", "0"], "--epochs must be positive (got 0)"),
    (["supernet", "train", "--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["search", "--supernet", "x", "--macs", "nan"], "--macs: a MACs budget must be a positive finite number"),
    (["search", "--supernet", "x", "--macs", "1G", "--batch-size", "0"], "--batch-size must be positive (got 0)"),
    (["search", "--supernet", "x", "--latency-ms", "nan"], "--latency-ms must be a finite number (got nan)"),
    (["search", "--supernet", "x", "--macs", "1G", "--iterations", "-2"], "--iterations must be positive (got -2)"),
    (["bench", "--threads", "-1"], "--threads must not be negative (got -1)"),
    (["bench", "--time-budget", "nan"], "--time-budget must be a finite number (got nan)"),
    (["bench", "--total-budget", "-5"], "--total-budget must be positive (got -5.0)"),
    (["bench", "--iters", "-3"], "--iters must be positive (got -3)"),
    (["bench", "--warmup", "-1"], "--warmup must not be negative (got -1)"),
    (["export", "--checkpoint", "x", "--format", "onnx", "--img-size", "-1", "32"],
     "--img-size must be positive (got [-1, 32])"),
])
def test_numeric_options_out_of_range_are_one_line_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and "Traceback" not in err, err
    assert err.strip().splitlines() == [f"linvision: error: {message}"] or \
        (len(err.strip().splitlines()) == 1 and message in err), err
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_search_settings_that_are_not_json_on_resume(tmp_path, capsys):
    (tmp_path / "search.json").write_text("{not json")
    rc, _, err = run(capsys, "search", "--resume", tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "cannot resume:" in err and "search.json is not readable JSON" in err


@pytest.mark.parametrize("exc,message", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"),
     "linvision: error: No space left on device: /runs/x/model.safetensors (the disk is full; free space and "
     "--resume)"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/a.jpg"), "linvision: error: Permission denied: "
                                                                         "/data/a.jpg"),
    (MemoryError(), "linvision: error: out of memory (try a smaller --batch-size or input size)"),
])
def test_oserror_and_memoryerror_are_one_line_errors_and_tracebacks_with_debug(exc, message, capsys, monkeypatch):
    def boom(ns):
        raise exc
    monkeypatch.setattr(cli, "_cmd_eval", boom)
    rc, out, err = run(capsys, "eval", "--checkpoint", "x")
    assert (rc, out, err.strip().splitlines()) == (2, "", [message])
    with pytest.raises(type(exc)):
        main(["eval", "--checkpoint", "x", "--debug"])
