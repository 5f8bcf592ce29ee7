"""Publish: merge a checkpoint and push it to the Hub at the same time, plus the seed workflow's API.

Each output file starts uploading as soon as the merge has finished and verified it, while the
merge writes the next one, so a push takes about as long as the longer of the two, not their sum
(:func:`merge_and_push`). The token's right to write to the repo is checked before the merge
starts; the repo (and branch) are made only when the first file is ready, and removed again if the
merge then fails, so a failed merge leaves nothing behind on the Hub. The commits come last: data
files first, then index, config and model card (see :mod:`streammerge.hub.commits`).

Re-running the same call after an interruption is cheap: the merge re-uses the files its manifest
lists and the Hub is not sent what it already has.

For users of the training-time uploader this project grew from, the same names work unchanged:
an ``hf_upload:`` block in a YAML training config (:func:`load_push_config`),
:func:`upload_checkpoint_to_hf` and :class:`HuggingFaceUploader`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..model_folder import hub_id
from ..optimizer import OPTIMIZER_DIR, OPTIMIZER_PT, optimizer_save_mode_enabled
from ..options import UPLOAD_WORKERS, MergeOptions
from ..paths import user_path
from ..pipeline import MergePlan, MergeResult, merge, plan_merge
from ..sources import Source, open_checkpoint
from ..write.transaction import check_out_dir
from .card import make_model_card
from .pusher import OWNED_PATTERNS, HubPusher, earlier_card_check, edited_card_check
from .repo import repo_name_for
from .retry import PushError, RetryPolicy

logger = logging.getLogger(__name__)

CONFIG_BLOCK = "hf_upload"
CONFIG_KEYS = ("enabled", "repo_id", "organization", "private", "optimizer_save_mode")
DEFAULT_OUT_SUFFIX = "-hf"


# ---- settings: the hf_upload block and the flags that override it ------------------------------
@dataclass
class PushConfig:
    """The seed workflow's ``hf_upload:`` block; CLI flags and arguments override its fields."""

    enabled: bool = False
    repo_id: str | None = None  # None: named after the output folder (see merge_and_push)
    organization: str | None = None
    private: bool | None = None  # None: private only when the repo name is inferred
    optimizer_save_mode: str | None = "full"

    @property
    def optimizer(self) -> bool:
        return self.optimizer_save_mode is not None

    def override(self, **flags: Any) -> PushConfig:
        """A copy with every flag that is not None applied (a CLI flag beats the file)."""
        changes = {k: v for k, v in flags.items() if v is not None}
        if "optimizer_save_mode" in changes:
            changes["optimizer_save_mode"] = optimizer_mode(changes["optimizer_save_mode"])
        return dataclasses.replace(self, **changes)


def optimizer_mode(value: Any) -> str | None:
    """``"full"`` or None; also accepts the seed CLI's ``"none"`` and YAML's ``false``."""
    try:
        return "full" if optimizer_save_mode_enabled(value) else None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def find_config_block(data: Any, key: str = CONFIG_BLOCK) -> dict | None:
    """The ``key:`` mapping anywhere in a parsed YAML document (top level or nested), or None.

    Training configs nest it differently (``hf_upload:`` at the top, or ``trainer.hf_upload:``);
    two different blocks in one file are refused rather than guessed between.
    """
    found: list[tuple[str, Any]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                path = f"{where}.{k}" if where else str(k)
                if k == key:
                    found.append((path, v))
                else:
                    walk(v, path)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(data, "")
    blocks = [(p, v) for p, v in found if v is not None]
    if not blocks:
        return {} if found else None
    if any(v != blocks[0][1] for _, v in blocks[1:]):
        raise ConfigError(f"several different {key}: blocks ({', '.join(p for p, _ in blocks)}); keep one")
    path, block = blocks[0]
    if not isinstance(block, Mapping):
        raise ConfigError(f"{path} must be a mapping of {', '.join(CONFIG_KEYS)}")
    return dict(block)


def load_push_config(path: str | os.PathLike) -> PushConfig:
    """Read the ``hf_upload:`` block of a YAML file (a whole training config is fine)."""
    import yaml

    path = user_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        block = find_config_block(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if block is None:
        raise ConfigError(f"{path}: no {CONFIG_BLOCK}: block found")
    for key in block:  # a typo such as "privat" must not publish a private model publicly
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), CONFIG_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in {CONFIG_BLOCK}: {hint}(known keys: "
                              f"{', '.join(CONFIG_KEYS)}); nothing was merged or pushed")
    for k in ("repo_id", "organization"):
        v = block.get(k)
        if isinstance(v, str) and "${" in v:
            raise ConfigError(f"{path}: {CONFIG_BLOCK}.{k} is {v!r}, an interpolation streammerge cannot resolve; "
                              f"pass --{k.replace('_', '-')} instead")
    for k in ("enabled", "private"):  # a string ("${oc.env:...}", "false") must not publish by being truthy
        v = block.get(k)
        if v is not None and not isinstance(v, bool):
            flag = "push" if k == "enabled" else k
            raise ConfigError(f"{path}: {CONFIG_BLOCK}.{k} is {v!r}, not true or false (an interpolation or a string "
                              f"is not resolved); pass --{flag} or --no-{flag} instead")
    private = block.get("private")
    config = PushConfig(enabled=block.get("enabled") is True, repo_id=block.get("repo_id") or None,
                        organization=block.get("organization") or None, private=private)
    if "optimizer_save_mode" in block:
        try:
            config.optimizer_save_mode = optimizer_mode(block["optimizer_save_mode"])
        except ConfigError as e:
            raise ConfigError(f"{path}: {CONFIG_BLOCK}.{e}") from None
    return config


def push_settings(config_file: str | os.PathLike | None = None, *, push: bool | None = None,
                  repo_id: str | None = None, organization: str | None = None, private: bool | None = None,
                  optimizer_save_mode: str | None = None) -> PushConfig:
    """The ``hf_upload:`` block of ``config_file`` (if any) with every given flag applied on top.

    Without a repo id anywhere the push names the repo after the output folder (:func:`merge_and_push`).
    """
    base = load_push_config(config_file) if config_file else PushConfig()
    return base.override(enabled=push, repo_id=repo_id, organization=organization, private=private,
                         optimizer_save_mode=optimizer_save_mode)


# ---- where things come from and go -----------------------------------------------------------
def default_out_dir(ck: Source) -> Path:
    """``<actor folder>-hf`` next to the actor folder: e.g. ``global_step_500/actor-hf``.

    Outside the checkpoint's own folder, on the file system that already holds the checkpoint (so
    it has room), found again by a re-run (so it resumes), and removed with the step folder when
    the trainer rotates old checkpoints out.
    """
    return ck.path.parent / (ck.path.name + DEFAULT_OUT_SUFFIX)


def resolve_checkpoint(checkpoint_dir: str | os.PathLike, step: int | None = None) -> Source:
    """The checkpoint at ``checkpoint_dir``; with ``step``, its ``global_step_{step}`` when it is a run folder."""
    path = user_path(checkpoint_dir)
    if step is not None and (path / f"global_step_{int(step)}").is_dir():
        path = path / f"global_step_{int(step)}"
    ck = open_checkpoint(path)
    if step is not None and ck.step is not None and ck.step != int(step):
        raise CheckpointError(f"{ck.path} is the checkpoint of step {ck.step}, not of step {step}; "
                              "give the run folder or the matching global_step folder")
    if step is not None and ck.step is None:
        ck.step = int(step)
    return ck


# ---- merge and push --------------------------------------------------------------------------
@dataclass
class PushResult:
    """What a push did; ``ok`` is False (and ``error`` says why) only when failures are not raised."""

    ok: bool
    repo_id: str | None = None
    url: str | None = None  # the repo's page
    revision: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    out_dir: Path | None = None
    step: int | None = None
    files: list[str] = field(default_factory=list)  # paths in the repo this push covered
    unchanged: list[str] = field(default_factory=list)  # of those, what the Hub already had
    deleted: list[str] = field(default_factory=list)  # stale files of an earlier push, deleted
    commits: int = 0
    merge: MergeResult | None = None
    seconds: float = 0.0
    error: str | None = None
    error_kind: str | None = None  # PushError.kind ("auth", "permission", ...) or the exception type
    note: str | None = None
    verify: Any = None  # the VerifyReport, when the push was asked to verify first

    def __repr__(self) -> str:
        """Short: the merge result (plans of every tensor) and the file lists are left out."""
        shown = {k: getattr(self, k) for k in ("repo_id", "revision", "commit_oid", "step", "error_kind", "error",
                                               "note")}
        parts = [f"ok={self.ok}"] + [f"{k}={v!r}" for k, v in shown.items() if v is not None]
        parts += [f"files={len(self.files)}", f"commits={self.commits}", f"seconds={self.seconds:.1f}"]
        return f"PushResult({', '.join(parts)})"

    def summary(self) -> str:
        if not self.ok:
            return f"push failed: {self.error}"
        if self.note:
            return self.note
        sent = len(self.files) - len(self.unchanged)
        if not self.commits:
            what = f"the Hub already had all {len(self.files)} files, nothing committed"
        else:
            unchanged = f" ({len(self.unchanged)} were already there)" if self.unchanged else ""
            what = f"{sent} files committed in {self.commits} commit{'s' if self.commits != 1 else ''}{unchanged}"
            if self.deleted:
                what += f", {len(self.deleted)} stale files of an earlier push deleted"
        return (f"pushed to {self.url or self.repo_id} (revision {self.revision}) in {self.seconds:.1f} s: {what}; "
                f"{self.commit_url}")


def check_push_counts(max_files_per_commit: int = 50, upload_workers: int = UPLOAD_WORKERS) -> None:
    """Refused before anything starts, in the words of the flags too (HubPusher would refuse them later)."""
    for name, value in (("max_files_per_commit", max_files_per_commit), ("upload_workers", upload_workers)):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) is {value!r}; it must be at least 1")


def merge_and_push(checkpoint: str | os.PathLike | Source, out_dir: str | os.PathLike | None,
                   repo_id: str | None, *, organization: str | None = None, private: bool | None = None,
                   revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                   endpoint: str | None = None, options: MergeOptions | None = None,
                   optimizer: bool | None = None, model_name: str | None = None, model_card: bool = True,
                   max_files_per_commit: int = 50, upload_workers: int = UPLOAD_WORKERS,
                   retry: RetryPolicy | None = None, delete_stale: bool = True, verify: bool = False,
                   **merge_options: Any) -> PushResult:
    """Merge ``checkpoint`` into ``out_dir`` and push it to ``repo_id``, uploading while merging.

    ``out_dir=None`` uses :func:`default_out_dir`. ``repo_id=None`` names the repo after ``out_dir``,
    as transformers' ``push_to_hub`` does (``<user or organization>/<folder name>``, made a valid name
    by :func:`.repo.repo_name_for`), and creates it private unless ``private=False``; with a given
    ``repo_id``, ``private=None`` means public. An existing repo keeps its visibility (a warning says
    so when ``private=True`` meets a public repo). ``model_name`` (local folder or Hub model) replaces
    the checkpoint's ``huggingface/`` folder as the source of config and tokenizer. ``options`` (a
    :class:`MergeOptions`) and ``merge_options`` (dtype, max_shard_size, workers, ... applied over it)
    are the merge's options, as for :func:`streammerge.merge`. Raises :class:`PushError`
    when the push fails (the local folder is kept as the merge left it; re-run to resume) and
    :class:`StreammergeError` when the merge does. The repo (or branch) is created when the first
    merged file is ready; when the merge fails, one created by this call is deleted again.

    ``delete_stale`` (default True): the last commit deletes the files at the revision that match
    :data:`OWNED_PATTERNS` (weight shards and their index, ``optimizer/``) and are not part of this
    push, e.g. the 4th shard of an earlier 4-shard merge, or an earlier optimizer export when this
    push has none. A push that brings no README.md (``model_card=False`` and none in ``huggingface/``)
    also deletes a README.md that is a card an earlier push generated, byte for byte (it describes
    that upload); one edited since stays, with a warning. Nothing else is ever deleted. With
    ``delete_stale=False`` the push only adds, and is refused (:class:`PushError`, nothing committed) where the
    revision would keep weights of an earlier push beside the new ones; so is any push where the revision holds
    another model's tokenizer or generation config that this one does not bring.

    ``verify=True`` checks the finished folder against the checkpoint (:func:`streammerge.verify`) before the
    commit: on a failure nothing is committed (a repo or branch this call created is removed again) and the
    result has ``ok=False``, ``error_kind="verify"`` and the report in ``verify``.

    huggingface_hub's own progress bars show only with ``progress=True`` (a merge option).
    """
    t0 = time.perf_counter()
    check_push_counts(max_files_per_commit, upload_workers)
    given = {"model_name": model_name} if model_name is not None else {}  # None keeps options' --model-name
    opts = MergeOptions.create(options, **merge_options, optimizer=optimizer, **given)
    ck = checkpoint if isinstance(checkpoint, Source) else open_checkpoint(Path(checkpoint))
    out = user_path(out_dir) if out_dir is not None else default_out_dir(ck)
    inferred = not repo_id
    if inferred:
        if out_dir is None:
            raise ConfigError(f"no repo_id: give one, or an out_dir to name the repo after (the default output "
                              f"folder {out.name!r} does not name the model)")
        try:
            repo_id = repo_name_for(out)
        except ValueError as e:
            raise ConfigError(f"{out}: {e}") from None
    if private is None:
        private = inferred  # a name we made up is not a decision to publish
    with ExitStack() as stack:
        stack.enter_context(_hub_progress_bars(opts.progress))
        assert repo_id  # given, or named after the output folder above
        pusher = HubPusher(repo_id, token=token, endpoint=endpoint, private=private, organization=organization,
                           revision=revision, commit_message=commit_message,
                           max_files_per_commit=max_files_per_commit, max_workers=upload_workers, retry=retry,
                           delete_patterns=OWNED_PATTERNS if delete_stale else None,
                           delete_if={"README.md": earlier_card_check(lambda: pusher.repo_id)} if delete_stale
                           else None)
        stack.callback(pusher.close)
        full_id = pusher.check_access()  # a bad token fails now, not after the merge; nothing is created yet
        logger.info("pushing to %s (revision %s%s) while merging into %s", pusher.repo.url, pusher.revision,
                    ", named after the output folder" if inferred else "", out)
        files: list[str] = []

        def upload(f, path: Path) -> None:
            pusher.submit(path, f.filename, sha256=f.sha256, size=f.size)
            files.append(f.filename)

        check_out_dir(out.resolve(), ck.path)  # before seconds of planning, where the refusal needs no plan
        plan = plan_merge(ck, opts, token=token, endpoint=endpoint)  # a bad checkpoint fails before the Hub is touched
        has_optimizer = plan.plan(OPTIMIZER_DIR) is not None
        if model_card and "README.md" not in plan.small:  # a README carried from huggingface/ is the user's own
            label = source_label(ck)
            plan.add_generated("README.md", lambda: _card(plan, full_id, label).encode())
            if delete_stale:  # a README on the Hub that someone wrote or edited is theirs: kept, with a warning
                pusher.committer.keep_if["README.md"] = edited_card_check(lambda: pusher.repo_id)
        plan.no_card = delete_stale and "README.md" not in plan.small  # the commit deletes an earlier push's card
        try:
            result = merge(plan, out, on_file_done=upload, hash_sha256=True)
        except Exception:  # not KeyboardInterrupt: an interrupted push resumes, its uploads are kept
            pusher.discard()  # the repo/branch made for the first file, if any: a failed merge leaves nothing
            raise
        report = None
        if verify:
            from ..verify import verify as verify_folder

            report = verify_folder(result.out_dir, ck.root if isinstance(checkpoint, Source) else Path(checkpoint),
                                   trust_pickle=opts.trust_pickle)
            if not report.ok:
                removed = pusher.discard()
                gone = f"; removed what this push created ({', '.join(removed)})" if removed else ""
                return PushResult(ok=False, repo_id=pusher.repo_id, revision=pusher.revision, out_dir=result.out_dir,
                                  step=ck.step, merge=result, seconds=time.perf_counter() - t0, verify=report,
                                  error=f"verify found {len(report.failures)} problem(s): nothing committed{gone}",
                                  error_kind="verify")
        if commit_message is None:
            what = "model and optimizer" if has_optimizer else "model"
            step = f" from step {ck.step}" if ck.step is not None else ""
            pusher.commit_message = f"Upload {what}{step} with streammerge"
        info = pusher.finish()
        if "README.md" in pusher.deleted:
            logger.info("%s: deleted README.md, the model card an earlier push generated (unedited): it described "
                        "that upload, and this push writes none", pusher.repo_id)
    return PushResult(ok=True, repo_id=pusher.repo_id, url=pusher.repo.url, revision=pusher.revision,
                      commit_url=info.commit_url, commit_oid=info.oid, out_dir=result.out_dir, step=ck.step,
                      files=files, unchanged=list(pusher.unchanged), deleted=list(pusher.deleted),
                      commits=len(pusher.commits), merge=result, seconds=time.perf_counter() - t0, verify=report)




def source_label(ck: Source) -> str:
    """The checkpoint as the model card names it: relative to its run folder, never a local path.

    ``global_step_500/actor`` for a trainer's layout, else the folder's own name: an absolute path
    tells the repo's readers nothing and tells them about the machine it was merged on.
    """
    step_dir = ck.path.parent.name
    return f"{step_dir}/{ck.path.name}" if re.fullmatch(r"global_step_\d+", step_dir) else ck.path.name


@contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's upload bars follow the merge's ``progress`` (off for ``--no-progress``), then are restored."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


FORMAT_TAGS = {"veRL FSDP": ["verl", "fsdp"], "torch DCP": ["torch-dcp"], "Megatron torch_dist": ["megatron"]}


def _card(plan: MergePlan, repo_id: str, source: str) -> str:
    """The model card, from the plan alone (so it is written and recorded like every other file of the merge)."""
    ck, opts, info = plan.source, plan.options, plan.source.info()
    names = sorted({t.dtype.name for t in plan.weights.tensors.values() if t.dtype.is_floating_point})
    optimizer = plan.plan(OPTIMIZER_DIR)
    fmt = None if optimizer is None else ("torch" if optimizer.files[0].filename == OPTIMIZER_PT else "safetensors")
    hub_model = hub_id(opts.model_name)
    lora_base = (plan.lora or {}).get("base_model")
    lora = {**plan.lora, "base_model": hub_id(lora_base) or (PurePosixPath(lora_base).name if lora_base else None)} \
        if plan.lora else None  # a local base folder by its name only: a path tells the repo's readers nothing
    loads = plan.config is not None and bool(plan.weights.files) and "config.json" in plan.small
    return make_model_card({
        "repo_id": repo_id, "source": source, "format": ck.format, "step": ck.step,
        "tags": FORMAT_TAGS.get(ck.format, []), "loads": loads,
        "tokenizer": any(PurePosixPath(n).name.startswith("tokenizer") for n in plan.small),
        "world_size": info.get("world size"), "fsdp_version": info.get("FSDP"), "dtype": ", ".join(names) or None,
        "optimizer": optimizer is not None, "optimizer_format": fmt,
        "model_type": (plan.config or {}).get("model_type"), "notes": plan.weights.notes,
        "model_class": _builtin_class(plan.config),
        "base_model": hub_model or hub_id(lora_base), "lora": lora,
    })


def _builtin_class(config: Mapping[str, Any] | None) -> str | None:
    """The model class config.json names, where it is transformers' own (no auto_map): the card loads with it."""
    archs = (config or {}).get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str) or (config or {}).get("auto_map"):
        return None
    return archs[0] if archs[0].isidentifier() else None


# ---- the seed workflow's API -------------------------------------------------------------------
def _run(raise_on_error: bool, what: str, fn: Callable[[], PushResult]) -> PushResult:
    """``fn()``; with ``raise_on_error=False`` any failure is logged as one error line and returned, never raised.

    The seed workflow uploads at the end of training: a bad token, a missing checkpoint or a Hub
    that is down must not turn hours of finished training into a crashed job.
    """
    t0 = time.perf_counter()
    try:
        if _other_rank():
            return PushResult(ok=True, note="not rank 0: nothing to do here (rank 0 merges and pushes)")
        return fn()
    except Exception as e:
        if raise_on_error:
            raise
        kind = e.kind if isinstance(e, PushError) else type(e).__name__
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or kind
        logger.error("%s failed (%s): %s", what, kind, message)
        logger.debug("traceback of the failed upload", exc_info=True)
        return PushResult(ok=False, error=message, error_kind=kind, seconds=time.perf_counter() - t0)


def _other_rank() -> bool:
    """True on ranks other than 0 of an initialized torch.distributed job (the seed uploaded from rank 0)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


class HuggingFaceUploader:
    """Drop-in for the seed workflow's uploader: merge a veRL checkpoint and push it to the Hub.

    ``HuggingFaceUploader(repo_id="me/model", optimizer_save_mode="full").upload_from_checkpoint_dir(
    checkpoint_dir="ckpts/exp/global_step_500/actor", step=500)``. A failed upload is logged as one
    error line and returned as ``PushResult(ok=False, error=...)``, so a training job that uploads
    at its end cannot crash because of it; ``raise_on_error=True`` raises instead (and checks the
    arguments at once). Under torch.distributed only rank 0 works; the other ranks return at once
    (no barrier, so a long upload cannot time out a collective).
    """

    def __init__(self, repo_id: str | None = None, organization: str | None = None, private: bool | None = None,
                 optimizer_save_mode: str | None = None, *, token: str | None = None, endpoint: str | None = None,
                 revision: str | None = None, commit_message: str | None = None, raise_on_error: bool = False,
                 **options: Any):
        self.repo_id = repo_id
        self.organization = organization
        self.private = private
        self.optimizer_save_mode = optimizer_save_mode
        self.token = token
        self.endpoint = endpoint
        self.revision = revision
        self.commit_message = commit_message
        self.raise_on_error = raise_on_error
        self.options = options  # merge_and_push / merge options: dtype, max_shard_size, retry, ...
        if raise_on_error:
            optimizer_mode(optimizer_save_mode)  # a bad value fails now rather than after training

    def upload_from_checkpoint_dir(self, checkpoint_dir: str | os.PathLike, model_name: str | None = None,
                                   step: int | None = None, *, out_dir: str | os.PathLike | None = None,
                                   raise_on_error: bool | None = None) -> PushResult:
        """Merge the checkpoint (actor, global_step_N or run folder; ``step`` picks global_step_N) and push it.

        Config and tokenizer come from the checkpoint's ``huggingface/`` folder, or from
        ``model_name`` when given. The merged folder goes to ``out_dir``, by default
        ``<actor folder>-hf`` beside the actor folder (kept, so a re-run resumes).
        """
        def work() -> PushResult:
            optimizer = optimizer_mode(self.optimizer_save_mode) is not None
            ck = resolve_checkpoint(checkpoint_dir, step)
            return merge_and_push(ck, out_dir, self.repo_id, organization=self.organization, private=self.private,
                                  revision=self.revision, commit_message=self.commit_message, token=self.token,
                                  endpoint=self.endpoint, optimizer=optimizer, model_name=model_name, **self.options)

        raise_ = self.raise_on_error if raise_on_error is None else raise_on_error
        result = _run(raise_, f"upload of {checkpoint_dir} to {self.repo_id or 'the Hub'}", work)
        if result.ok:
            logger.info("%s", result.summary())
        return result


def upload_checkpoint_to_hf(checkpoint_dir: str | os.PathLike, model_name: str | None = None,
                            repo_id: str | None = None, step: int | None = None, organization: str | None = None,
                            private: bool | None = None, optimizer_save_mode: str | None = "full", *,
                            out_dir: str | os.PathLike | None = None, raise_on_error: bool = False,
                            **options: Any) -> PushResult:
    """Merge a veRL checkpoint and push it to the Hub: the seed workflow's one-call entry point.

    Same arguments, in the same order, as the seed's function; ``model_name`` is optional here. A
    failure is logged as one error line and returned (``ok=False``) unless ``raise_on_error=True``.
    ``options``: ``token``, ``endpoint``, ``revision``, ``commit_message`` and merge options.
    """
    return HuggingFaceUploader(repo_id, organization, private, optimizer_save_mode, **options) \
        .upload_from_checkpoint_dir(checkpoint_dir, model_name, step, out_dir=out_dir, raise_on_error=raise_on_error)


__all__ = ["OWNED_PATTERNS", "ConfigError", "HuggingFaceUploader", "PushConfig", "PushResult", "default_out_dir",
           "load_push_config", "merge_and_push", "push_settings", "resolve_checkpoint", "source_label",
           "upload_checkpoint_to_hf"]
