"""Command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from . import __version__
from .errors import ConfigError, StreammergeError
from .options import CHECKSUMS, DTYPE_CHOICES, LORA_MODES, OPTIMIZER_FORMATS, UPLOAD_WORKERS, MergeOptions

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
_ENTRY = False  # set by run(): this process is the command, not a program calling main()
PUSH_FAILED = 4  # exit code: the push (or, in watch, a step) failed; re-running resumes it
HELP = """streammerge CKPT_DIR OUT_DIR [options]     merge a sharded checkpoint into a Hugging Face folder
streammerge inspect CKPT_DIR [--json]       print the merge plan without writing
streammerge verify OUT_DIR [CKPT_DIR]       check an output folder (and, given the checkpoint, every tensor)
streammerge demo [OUT_DIR]                  make a small real sharded checkpoint and merge it
streammerge CKPT_DIR OUT_DIR --push [--repo-id NAME]  merge and push to the Hugging Face Hub at the same time
streammerge watch RUN_DIR --push --repo-id NAME      merge and push each new checkpoint of a training run"""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors said in one line (its usage block would bury the line that says what is wrong)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> str:
    """A path argument as typed; an empty one (an unset shell variable, quoted) would be taken as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return text


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT_DIR", type=_path,
                   help="actor/ folder, global_step_N folder, run folder, a torch DCP or Megatron torch_dist folder, "
                        "a Megatron-LM legacy iter_N folder (mp_rank_*/), "
                        "a DeepSpeed ZeRO save (its folder, global_stepN/, or the HF Trainer's checkpoint-N/), or one "
                        "torch.save file of a whole model (a Lightning .ckpt)")
    p.add_argument("out_dir", metavar="OUT_DIR", type=_path,
                   help="output folder (new or empty; or a previous run to resume)")
    _plan_args(p)
    _write_args(p)
    p.add_argument("--keep-cache", action="store_true",
                   help="leave read and written data in the page cache (default: drop it, for small memory limits)")
    p.add_argument("--verify", action="store_true",
                   help="after the merge, check every output file and every tensor against the checkpoint")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="threads that fill windows: copy, cast, fold (default 2, or 1 on a single CPU; never more "
                        "than the windows in flight)")
    p.add_argument("--buffer-size", default="64MiB", help="total window buffer memory (default 64MiB)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="output dtype of floating tensors: auto = the config's dtype, else keep (default auto)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file, decimal units (default 5GB)")
    p.add_argument("--no-optimizer", action="store_true", help="do not export optimizer state")
    p.add_argument("--optimizer-format", choices=OPTIMIZER_FORMATS, default="safetensors",
                   help="optimizer export: sharded safetensors + index (default), or one optimizer.pt for torch.load")
    p.add_argument("--model-name", metavar="NAME_OR_PATH", type=_path,
                   help="take config and tokenizer from this model folder or Hub model, not from huggingface/")
    p.add_argument("--weights-only", action="store_true",
                   help="a checkpoint without a config: write the weights alone (transformers cannot load the "
                        "folder as a model); without this flag such a merge is refused")
    p.add_argument("--trust-pickle", action="store_true",
                   help="DANGEROUS: load rank files with weights_only=False (runs any code pickled in them); "
                        "only for files you made yourself")
    g = p.add_argument_group("LoRA checkpoints (peft-named tensors)")
    g.add_argument("--lora", choices=LORA_MODES, default="both",
                   help="fold the adapter into the weights, export it as a peft adapter folder, or both (default)")
    _lora_setting_args(g)
    _base_model_arg(g)
    g = p.add_argument_group("torch DCP checkpoints")
    g.add_argument("--key-prefix", metavar="PREFIX",
                   help="strip this prefix from DCP keys "
                        "(default: detect 'model.' of {'model': ..., 'optimizer': ...})")


def _base_model_arg(g: argparse._ArgumentGroup, verify: bool = False) -> None:
    g.add_argument("--base-model", metavar="NAME_OR_PATH", type=_path,
                   help="base weights for an adapter-only (save_lora_only) checkpoint: a model folder or Hub model; "
                        "also its config and tokenizer where the checkpoint has no config.json" +
                        (", as the merge took them, for a folder without a manifest" if verify else ""))


def _lora_setting_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--lora-rank", type=int, metavar="R", help="r, when the checkpoint has no lora_train_meta.json")
    g.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                   help="lora_alpha, when the checkpoint has no lora_train_meta.json")
    g.add_argument("--lora-rslora", action="store_true", default=None,
                   help="the run used rsLoRA (scale alpha/sqrt(r)), when lora_train_meta.json does not say")


def merge_options(args: argparse.Namespace, **overrides: object) -> MergeOptions:
    """The one options object every command builds from its flags."""
    progress = getattr(args, "progress", False)
    fields = dict(
        dtype=args.dtype, max_shard_size=args.max_shard_size, optimizer=not args.no_optimizer,
        trust_pickle=args.trust_pickle, model_name=args.model_name, lora=args.lora, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_rslora=getattr(args, "lora_rslora", None), base_model=args.base_model,
        key_prefix=args.key_prefix, weights_only=getattr(args, "weights_only", False),
        optimizer_format=getattr(args, "optimizer_format", "safetensors"), workers=getattr(args, "workers", None),
        buffer_size=getattr(args, "buffer_size", None), drop_cache=not getattr(args, "keep_cache", False),
        progress=sys.stderr.isatty() if progress is None else bool(progress))
    fields.update(overrides)
    return MergeOptions.create(**fields)


def _push_args(p: argparse.ArgumentParser, *, repo_default: str = "default: named after OUT_DIR in your namespace, "
               "created private") -> None:
    g = p.add_argument_group("push to the Hugging Face Hub",
                             "Token from HF_TOKEN or `hf auth login`, endpoint from HF_ENDPOINT.")
    g.add_argument("--push", action=argparse.BooleanOptionalAction, default=None,
                   help="push to the Hub, uploading each file while the next is merged")
    g.add_argument("--repo-id", metavar="NAME",
                   help=f"NAME or NAMESPACE/NAME; created if missing, updated if it exists ({repo_default})")
    g.add_argument("--organization", metavar="ORG", help="namespace for a NAME without one")
    g.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                   help="create the repo private (an existing repo keeps its visibility; a warning says so)")
    g.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default main; created from main)")
    g.add_argument("--commit-message", metavar="TEXT")
    g.add_argument("--config", metavar="FILE", type=_path,
                   help="YAML file with an hf_upload: block (top level or nested); flags override it")
    g.add_argument("--optimizer-save-mode", choices=["full", "none"], default=None,
                   help="seed workflow spelling: none = --no-optimizer")
    g.add_argument("--no-model-card", action="store_true",
                   help="do not write and push a README.md model card (an earlier push's card, unedited, is deleted)")
    g.add_argument("--max-files-per-commit", type=int, default=None, metavar="N",
                   help="split bigger pushes into several commits (default 50)")
    g.add_argument("--upload-workers", type=int, default=None, metavar="N",
                   help=f"files uploaded at once (default {UPLOAD_WORKERS})")


def _push_settings(args: argparse.Namespace):
    from .hub.publish import push_settings

    settings = push_settings(args.config, push=args.push, repo_id=args.repo_id, organization=args.organization,
                             private=args.private, optimizer_save_mode=args.optimizer_save_mode)
    if args.no_optimizer:
        settings.optimizer_save_mode = None
    return settings


def _refuse_push_flags_without_push(args: argparse.Namespace) -> None:
    """A push flag without --push (or a --config that decides) would be dropped and the command only merge: the user
    meant to push and forgot the flag that does. --no-push says that dropping them is meant."""
    if args.push is not None or args.config:
        return
    given = {"--repo-id": args.repo_id, "--organization": args.organization, "--private/--no-private": args.private,
             "--revision": args.revision, "--commit-message": args.commit_message,
             "--no-model-card": args.no_model_card or None, "--max-files-per-commit": args.max_files_per_commit,
             "--upload-workers": args.upload_workers}
    if getattr(args, "revision_per_step", False):
        given["--revision-per-step"] = True
    flags = [flag for flag, value in given.items() if value is not None]
    if flags:
        raise ConfigError(f"{flags[0]} is a push setting, and there is no --push: add --push to push, or leave "
                          f"{flags[0]} out to merge only")


def _say_logged_warnings() -> None:
    """The push's warnings (a public repo kept public, an edited model card kept, a retried call) come from its
    loggers: said as the merge's own warnings are, not as Python's bare last-resort lines."""
    import logging

    class Said(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            self.stream = sys.stderr  # the stream of the moment (a test's capture, a redirection)
            super().emit(record)

        def format(self, record: logging.LogRecord) -> str:
            return f"streammerge: {record.levelname.lower()}: {record.getMessage()}"

    root = logging.getLogger("streammerge")
    if not any(type(h).__name__ == "Said" for h in root.handlers):
        handler = Said()
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)


def _push_options(args: argparse.Namespace) -> dict:
    """The push's own settings; a count not given is left to the library's default."""
    counts = {"max_files_per_commit": args.max_files_per_commit, "upload_workers": args.upload_workers}
    return {"model_card": not args.no_model_card, "commit_message": args.commit_message,
            **{k: v for k, v in counts.items() if v is not None}}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: object) -> str:
    """Text for the terminal, control characters escaped as repr escapes them: a tensor or file name in a checkpoint
    may hold an escape sequence that clears the screen or rewrites what was printed above it (an error into "OK")."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def cmd_push(args: argparse.Namespace) -> int:
    from .hub.publish import merge_and_push
    from .hub.retry import PushError
    from .pipeline import merge

    settings = _push_settings(args)
    _warn_trust_pickle(args)
    _say_logged_warnings()
    options = merge_options(args, optimizer=settings.optimizer)
    if not settings.enabled:  # a config file with enabled: false, or --no-push
        if args.push is None:
            print(f"streammerge: {args.config} does not enable hf_upload: merging only (--push pushes anyway)",
                  file=sys.stderr)
        result = merge(args.checkpoint, args.out_dir, options)
    else:
        if settings.repo_id is None:
            _say_inferred_repo(args.out_dir, settings.organization, settings.private)
        try:
            pushed = merge_and_push(args.checkpoint, args.out_dir, settings.repo_id, organization=settings.organization,
                                    private=settings.private, revision=args.revision, options=options,
                                    verify=bool(args.verify), **_push_options(args))
        except PushError as e:
            print(f"streammerge: push failed: {shown(e)}", file=sys.stderr)
            return PUSH_FAILED
        assert pushed.merge is not None  # a push that returns has merged
        result = pushed.merge
    for w in result.warnings:
        print(f"streammerge: warning: {shown(w)}", file=sys.stderr)
    if settings.enabled or not args.verify:
        _decided()
    print(shown(result.summary()))
    if settings.enabled:
        if pushed.verify is not None:
            print(shown(pushed.verify.summary()))
        print(shown(pushed.summary()))
        return 0 if pushed.ok else 1
    return _verify_merged(result.out_dir, args) if args.verify else 0


def _say_inferred_repo(out_dir: str, organization: str | None, private: bool | None) -> None:
    """Say which repo a push without --repo-id goes to before the merge starts (the URL comes at the end)."""
    from .hub.repo import repo_name_for

    try:
        name = repo_name_for(out_dir)
    except ValueError:
        return  # merge_and_push refuses it with the reason
    where = f"{organization}/{name}" if organization else f"{name} in your namespace"
    visibility = "public" if private is False else "private"
    print(f"streammerge: no --repo-id: pushing to {where} (named after OUT_DIR; created {visibility} if missing)",
          file=sys.stderr)


def cmd_watch(args: argparse.Namespace) -> int:
    import logging

    from .hub.watch import Watcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s streammerge: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _refuse_push_flags_without_push(args)
    settings = _push_settings(args)
    _warn_trust_pickle(args)
    push_options = _push_options(args) if settings.enabled else {}
    watcher = Watcher(args.run_dir, push=settings.enabled, repo_id=settings.repo_id,
                      organization=settings.organization, private=settings.private, revision=args.revision,
                      revision_per_step=args.revision_per_step, only_latest=args.only_latest, out_root=args.out_root,
                      state_file=args.state_file, options=merge_options(args, optimizer=settings.optimizer,
                                                                        progress=False), **push_options)
    results = watcher.run(interval=args.interval, once=args.once)
    # a step a newer one superseded was left on purpose (a warning), not a failure
    return PUSH_FAILED if any(not r.ok and r.error_kind != "superseded" for r in results) else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .distributed import idle_summary, launched_by_torchrun, merge_torchrun
    from .errors import OutputError
    from .pipeline import merge

    torchrun = launched_by_torchrun()
    _refuse_push_flags_without_push(args)
    if args.push or args.config:
        if torchrun:
            raise OutputError("--push is not supported under torchrun: merge with torchrun, then push the folder "
                              "from one process")
        return cmd_push(args)
    _warn_trust_pickle(args)
    # --optimizer-save-mode none without a push: the seed workflow's spelling of --no-optimizer
    options = merge_options(args, **({"optimizer": False} if args.optimizer_save_mode == "none" else {}))
    result = (merge_torchrun if torchrun else merge)(args.checkpoint, args.out_dir, options)
    if result is None:  # a torchrun rank beyond local rank 0
        _say(idle_summary())
        return 0
    for w in result.warnings:
        _say(f"streammerge: warning: {w}", sys.stderr)
    if not args.verify:
        _decided()
    _say(result.summary())
    if args.verify and (not torchrun or os.environ.get("RANK") == "0"):  # one writer checks the whole folder
        return _verify_merged(result.out_dir, args)
    return 0


def _verify_merged(out_dir: Path, args: argparse.Namespace) -> int:
    """merge --verify: the finished folder against the checkpoint; verify's exit code."""
    from .verify import verify

    report = verify(out_dir, args.checkpoint, trust_pickle=args.trust_pickle)
    _decided()
    print(shown(report.summary()))
    return 0 if report.ok else 1


def _decided() -> None:
    """The command's outcome is settled (a merge or push finished and its summary comes next, or it stopped and said
    so): a Ctrl-C from here to the process's end (the interpreter's teardown takes a moment) would say "interrupted
    ... rerun to resume" and exit 130 for a folder that is complete, or add a traceback. Only for the process entry
    (`run`): a program calling `main` keeps its own Ctrl-C."""
    if _ENTRY:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _say(text: str, stream: TextIO | None = None) -> None:
    """One write per message: torchrun's ranks share one stdout, and print's separate newline (unbuffered,
    as under PYTHONUNBUFFERED) lets another rank's line land in the middle of this one."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    from .paths import user_path
    from .verify import verify

    if not os.path.lexists(user_path(args.out_dir)):  # a mistyped path, not a folder that failed its checks
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(args.out_dir))
    _warn_trust_pickle(args)
    report = verify(args.out_dir, args.checkpoint, trust_pickle=args.trust_pickle, checksums=args.checksums,
                    lora=args.lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                    lora_rslora=args.lora_rslora, base_model=args.base_model, model_name=args.model_name,
                    key_prefix=args.key_prefix)
    print(shown(report.summary()))
    return 0 if report.ok else 1


def _warn_trust_pickle(args: argparse.Namespace) -> None:
    """--trust-pickle is per run and never silent: say it once, loudly, before any file is opened."""
    if getattr(args, "trust_pickle", False):
        import warnings

        warnings.filterwarnings("ignore", message="loading .* with weights_only=False")  # the line below says it once
        print("streammerge: warning: --trust-pickle: rank files are unpickled with weights_only=False; "
              "any code pickled in them will run. Use it only for files you made yourself.", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .pipeline import plan_merge

    _warn_trust_pickle(args)
    p = plan_merge(args.checkpoint, merge_options(args, progress=False), check_architecture=False)
    if args.json:
        print(json.dumps(p.to_json(), indent=1))
    else:
        print(shown(p.describe(max_rows=None if args.all else 60)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .testing.demo import run_demo

    return run_demo(args.out_dir)


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "merge":
        p = _Parser(prog="streammerge", description="Merge a sharded checkpoint (veRL FSDP, LoRA, torch DCP, "
                    "Megatron torch_dist or legacy, DeepSpeed ZeRO; or one torch.save file) into a Hugging Face model "
                    "folder, streaming in bounded memory.", epilog=HELP,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
        _merge_args(p)
        _push_args(p)
    elif command == "watch":
        p = _Parser(prog="streammerge watch", description="Follow a training run's "
                    "latest_checkpointed_iteration.txt or DeepSpeed's latest tag (or the HF Trainer's checkpoint-N "
                    "folders, Lightning's *.ckpt saves); merge (and with --push, push) each new checkpoint once all "
                    "its rank files are there and no longer growing.")
        p.add_argument("run_dir", metavar="RUN_DIR", type=_path,
                       help="the trainer's checkpoint folder (holds global_step_N/, iter_NNNNNNN/, checkpoint-N/, "
                            "*.ckpt saves or DeepSpeed's global_stepN/)")
        _plan_args(p)
        _write_args(p)
        _push_args(p, repo_default="required with --push: every step is pushed to that repo")
        p.add_argument("--revision-per-step", action="store_true", help="push step N to branch step-N")
        p.add_argument("--only-latest", action="store_true",
                       help="only the newest step (the tracker's, else the newest finished checkpoint-N/ or "
                            "*.ckpt/); skip older unpushed steps")
        p.add_argument("--once", action="store_true", help="process what is there now, then exit")
        p.add_argument("--interval", type=float, default=60.0, metavar="SECONDS",
                       help="seconds between looks (default 60); with --once the two looks are at most 5 s apart")
        p.add_argument("--out-root", metavar="DIR", type=_path,
                       help="merge step N into DIR/global_step_N (default: RUN_DIR/global_step_N/actor-hf)")
        p.add_argument("--state-file", metavar="FILE", type=_path,
                       help="where pushed steps are recorded (default RUN_DIR/.streammerge-watch.json)")
    elif command == "inspect":
        p = _Parser(prog="streammerge inspect", description="Print the merge plan; writes nothing.")
        p.add_argument("checkpoint", metavar="CKPT_DIR", type=_path)
        _plan_args(p)
        p.add_argument("--all", action="store_true", help="list every tensor (default: the first 60)")
        p.add_argument("--json", action="store_true", help="machine-readable plan")
    elif command == "verify":
        p = _Parser(prog="streammerge verify",
                    description="Check a merged folder: headers, coverage, crc32 against the manifest, "
                                "index; given the checkpoint, every tensor against its source pieces. "
                                "Exit code 0 only when everything holds.")
        p.add_argument("out_dir", metavar="OUT_DIR", type=_path)
        p.add_argument("checkpoint", metavar="CKPT_DIR", nargs="?", default=None, type=_path)
        p.add_argument("--trust-pickle", action="store_true",
                       help="DANGEROUS: load rank files with weights_only=False")
        p.add_argument("--checksums", choices=CHECKSUMS, default="auto",
                       help="where veRL rank files' zip CRC-32s come from: 'streams' read each file beside the "
                            "comparison, 'compare' takes them from the comparison's own reads (for little page "
                            "cache); 'auto' picks by the memory free")
        g = p.add_argument_group("LoRA checkpoints", "Settings the checkpoint's files do not record, as the merge "
                                 "took them; a folder with a manifest is checked with those it records")
        g.add_argument("--lora", choices=LORA_MODES, default=None,
                       help="the merge's --lora, for a folder without a manifest (default: both)")
        _lora_setting_args(g)
        _base_model_arg(g, verify=True)
        g = p.add_argument_group("what else the merge was given", "as the merge took it, for a folder without a "
                                 "manifest (one with a manifest is checked with what it records)")
        g.add_argument("--model-name", metavar="NAME_OR_PATH", type=_path,
                       help="the config the merge took (a Megatron checkpoint's tensor names come from it)")
        g.add_argument("--key-prefix", metavar="PREFIX", help="the DCP container the merge took the model from")
    elif command == "demo":
        p = _Parser(prog="streammerge demo",
                    description="Make a small real FSDP2 checkpoint on CPU (gloo) and merge it.")
        p.add_argument("out_dir", nargs="?", default="streammerge-demo", metavar="OUT_DIR", type=_path)
    else:
        raise KeyError(command)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    return p


COMMANDS.update({"merge": cmd_merge, "inspect": cmd_inspect, "demo": cmd_demo, "verify": cmd_verify,
                 "watch": cmd_watch})


def _exit_now_if_uploading(code: int) -> None:
    """An upload in flight runs on a thread the interpreter waits for at exit (a whole shard, retries included),
    so an interrupted push would hang there after saying it stopped; the local folder is already consistent."""
    import threading

    if any(t.name.startswith("streammerge-push") and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    global _interrupt_said
    _interrupt_said = False
    command, argv = _command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(command).parse_args(argv)
    previous = _sigterm_as_interrupt()
    try:
        return COMMANDS[command](args)
    except BrokenPipeError:
        return 0
    except (KeyboardInterrupt, Exception) as e:
        if args.debug:
            raise
        if isinstance(e, KeyboardInterrupt):
            _decided()  # it stops and says so: a second Ctrl-C would only add a line or a traceback from the teardown
            _say_interrupted(command)
            _exit_now_if_uploading(130)
        elif exit_code(e) == 3:
            print(f"streammerge: internal error: {type(e).__name__}: {shown(e)} (rerun with --debug for the traceback, "
                  "and please report it)", file=sys.stderr)
        else:
            print(f"streammerge: error: {shown(e)}", file=sys.stderr)
        return exit_code(e)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def exit_code(e: BaseException) -> int:
    """The exit code an error ends a command with (the README's table): the error's own, 130 for an interrupt, 2 for
    a bad value or an OS error, 3 for anything else (an internal error)."""
    if isinstance(e, StreammergeError):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 2 if isinstance(e, (ValueError, OSError)) else 3


def _command(argv: list[str]) -> tuple[str, list[str]]:
    """The command a command line names (merge when it names none), and its arguments."""
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return "merge", argv


READ_ONLY = ("verify", "inspect")
INTERRUPTED = "streammerge: interrupted; finished files are kept, rerun the same command to resume"
_interrupt_said = False  # a second Ctrl-C that lands just after the first one's line must not say it again


def _say_interrupted(command: str) -> None:
    global _interrupt_said
    if not _interrupt_said:
        _interrupt_said = True
        print("streammerge: interrupted" if command in READ_ONLY else INTERRUPTED, file=sys.stderr)


def run() -> NoReturn:
    """The process entry (the `streammerge` script, `python -m streammerge`): `main`, then exit.

    verify imports torch to compare, and the interpreter's teardown of torch's modules would follow the report for
    nothing: a read-only command ends at once, after flushing its output. Commands that write exit normally.
    With --debug, `main` raises for the traceback; the process still exits with the code the error has without it.
    """
    global _ENTRY
    _ENTRY = True
    try:
        code = main()
    except (KeyboardInterrupt, Exception) as e:  # only --debug, or a Ctrl-C while the arguments are read
        code = exit_code(e)
        if code == 130 and "--debug" not in sys.argv[1:]:
            _decided()
            _say_interrupted(_command(sys.argv[1:])[0])
        else:
            import traceback

            traceback.print_exc()
        if code == 130:
            _exit_now_if_uploading(code)
    if _command(sys.argv[1:])[0] in READ_ONLY:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:  # the reader went away (`| head`), as main treats it
                pass
            except (OSError, ValueError):
                code = code or 120  # what Python's own exit returns when it cannot flush
        os._exit(code)
    sys.exit(code)


def _sigterm_as_interrupt():
    """A job scheduler's SIGTERM stops as cleanly as Ctrl-C (temp files removed, resumable)."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    run()
