"""The command line is a thin layer over the library: every flag is a library argument with the same default."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

import streammerge
from streammerge import cli
from streammerge.hub import publish
from streammerge.hub import watch as watch_module
from streammerge.options import MergeOptions

VERL = Path(__file__).parent / "data" / "verl" / "fsdp1_llama_ws4"
# flags whose library name differs from the flag's
RENAMED = {"no_optimizer": "optimizer", "keep_cache": "drop_cache"}
# flags that are not merge options: positional arguments, the process's own, what to print, and the push
NOT_OPTIONS = {"help", "version", "debug", "checkpoint", "out_dir", "run_dir", "verify", "all", "json"}


def _dests(parser) -> set[str]:
    return {a.dest for a in parser._actions}


def _push_dests() -> set[str]:
    p = cli.argparse.ArgumentParser()
    cli._push_args(p)
    return _dests(p) - {"help"}


@pytest.mark.parametrize("command,argv", [("merge", ["ck", "out"]), ("inspect", ["ck"]), ("watch", ["run"])])
def test_cli_defaults_are_the_library_defaults(command: str, argv: list[str]) -> None:
    args = cli.build_parser(command).parse_args(argv)
    assert cli.merge_options(args, progress=False) == MergeOptions()


@pytest.mark.parametrize("command,argv", [("merge", ["ck", "out"]), ("inspect", ["ck"]), ("watch", ["run"])])
def test_every_flag_is_a_merge_option(command: str, argv: list[str]) -> None:
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    extra = {"merge": set(), "inspect": set(),
             "watch": set(inspect.signature(watch_module.Watcher).parameters) | {"once", "interval"}}[command]
    dests = _dests(cli.build_parser(command)) - NOT_OPTIONS - _push_dests() - extra
    assert {RENAMED.get(d, d) for d in dests} <= fields


def test_every_merge_flag_reaches_the_options() -> None:
    argv = ["ck", "out", "--dtype", "bfloat16", "--max-shard-size", "1GB", "--no-optimizer", "--optimizer-format",
            "torch", "--model-name", "m", "--weights-only", "--trust-pickle", "--lora", "fold", "--lora-rank", "4",
            "--lora-alpha", "8", "--lora-rslora", "--base-model", "b", "--key-prefix", "model.", "--workers", "3",
            "--buffer-size", "32MiB", "--keep-cache", "--progress"]
    got = cli.merge_options(cli.build_parser("merge").parse_args(argv))
    default = MergeOptions()
    # float32_names is what a merge records (transformers' answer) and verify replays: the library's, no flag
    assert [f.name for f in dataclasses.fields(MergeOptions)
            if getattr(got, f.name) == getattr(default, f.name)] == ["float32_names"]


def test_inspect_takes_the_optimizer_format(capsys: pytest.CaptureFixture[str]) -> None:
    """The plan names optimizer.pt for --optimizer-format torch: inspect shows what merge would write."""
    assert cli.main(["inspect", str(VERL), "--optimizer-format", "torch", "--json"]) == 0
    plans = {p["subdir"]: [f["filename"] for f in p["files"]] for p in json.loads(capsys.readouterr().out)["plans"]}
    assert plans["optimizer"] == ["optimizer.pt"]


def test_push_flag_defaults_are_merge_and_push_defaults() -> None:
    args = cli.build_parser("merge").parse_args(["ck", "out"])
    signature = inspect.signature(publish.merge_and_push).parameters
    for key, value in cli._push_options(args).items():
        assert signature[key].default == value, key
    assert signature["private"].default is args.private is None
    assert signature["revision"].default is args.revision is None


def test_watch_flags_are_watch_arguments() -> None:
    args = cli.build_parser("watch").parse_args(["run"])
    watcher = inspect.signature(watch_module.Watcher).parameters
    for key in ("revision_per_step", "only_latest", "out_root", "state_file", "revision", "organization"):
        assert watcher[key].default == getattr(args, key), key
    assert inspect.signature(watch_module.watch).parameters["interval"].default == args.interval
    assert inspect.signature(watch_module.watch).parameters["once"].default == args.once
    assert streammerge.watch is watch_module.watch
    assert "watch" in streammerge.__all__


def test_verify_flags_are_verify_arguments() -> None:
    args = cli.build_parser("verify").parse_args(["out"])
    signature = inspect.signature(streammerge.verify).parameters
    for key in _dests(cli.build_parser("verify")) - NOT_OPTIONS:
        assert signature[key].default == getattr(args, key), key


def test_synthetic_help_names_its_module(capsys: pytest.CaptureFixture[str]) -> None:
    from streammerge.testing import synthetic

    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    assert "python -m streammerge.testing.synthetic" in capsys.readouterr().out


def test_bad_push_counts_and_watch_intervals_are_refused_at_once_in_one_line(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--upload-workers 0 was refused only once the push started, naming HubPusher's max_workers; --interval 0 (or
    less) made watch look at the run folder without pause."""
    with pytest.raises(streammerge.ConfigError, match=r"upload_workers \(--upload-workers\) is 0"):
        publish.merge_and_push(tmp_path / "no-checkpoint", tmp_path / "out", "me/x", upload_workers=0)
    with pytest.raises(streammerge.ConfigError, match=r"max_files_per_commit \(--max-files-per-commit\)"):
        watch_module.Watcher(tmp_path, push=False, max_files_per_commit=0)
    with pytest.raises(ValueError, match=r"--interval"):
        watch_module.Watcher(tmp_path, push=False).run(interval=0, once=True)
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    for argv in (["watch", str(tmp_path), "--interval", "-1", "--once"],
                 ["watch", str(tmp_path), "--push", "--repo-id", "me/x", "--upload-workers", "0", "--once"],
                 [str(tmp_path), str(tmp_path / "out"), "--push", "--repo-id", "me/x", "--max-files-per-commit", "0"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("streammerge: error: "), err


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """--debug raised out of the process, which then exited 1 (verify's 'found problems') whatever the error."""
    import os
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for extra in ([], ["--debug"]):  # --no-optimizer: naming its state would import torch and transformers first
        proc = subprocess.run([sys.executable, "-m", "streammerge", str(VERL), str(tmp_path / "out"), "--no-optimizer",
                               *extra],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert ("Traceback" in proc.stderr) == bool(extra) and "folder is not empty" in proc.stderr


@pytest.mark.parametrize("argv", [["", "out"], ["ckpt", ""], ["verify", "out", ""], ["inspect", " "], ["watch", ""],
                                  ["ckpt", "out", "--model-name", ""], ["ckpt", "out", "--base-model", ""],
                                  ["watch", "run", "--out-root", ""]])
def test_an_empty_path_is_refused_in_one_line(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An unset shell variable, quoted, gave "" and "" is the current folder: verify compared OUT with whatever
    checkpoint the shell stood in, and a merge wrote into the current folder when it was empty."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "an empty path (an unset shell variable?)" in err and "--help)" in err
    assert not any(tmp_path.iterdir())


def test_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["ckpt", "out", "--dtype", "int4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("streammerge: error: argument --dtype"), err
