"""Push a Hugging Face model folder to the Hub, file by file, while it is still being written.

The merge hands each output file to :class:`HubPusher` as soon as the file is complete; its content
goes up in the background (``preupload_lfs_files``) while the next file is being produced. Nothing
is visible on the Hub until :meth:`HubPusher.finish` commits (see :mod:`.commits` for the order).

Re-running after an interruption sends nothing the Hub already has: the LFS batch API reports blobs
already stored, and unchanged files are not committed again. The pusher works on files only; it
knows nothing about checkpoints or tensors.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from ..options import UPLOAD_WORKERS
from ..paths import walk
from .card import card_state
from .commits import WEIGHT_PATTERNS, Committer, Upload
from .repo import HubRepo, check_target
from .retry import Retrier, RetryPolicy

logger = logging.getLogger(__name__)

DEFAULT_IGNORE = (".streammerge/*", "*.streammerge-tmp")
ALWAYS_IGNORE = (".git/*", ".cache/huggingface/*")  # the Hub refuses these folders
RECOMMENDED_MAX_FILE_SIZE = 5 * 10**9  # the Hub's advice per file
HUB_MAX_FILE_SIZE = 50 * 10**9  # the Hub refuses bigger files

# What a push of ours owns in the repo: files matching these that the push does not bring are stale
# (a shard of an earlier merge with more shards, an old optimizer export) and deleted in its last
# commit. Matched from the repo root, `*` within one folder (see streammerge.hub.commits.matches).
OWNED_PATTERNS = (*WEIGHT_PATTERNS, "optimizer/**", "lora_adapter/**")


class HubPusher:
    """Uploads files to one Hub repo as they are produced, then commits them in a safe order.

    Use as a context manager: leaving the block normally calls :meth:`finish`; leaving it with an
    exception stops without committing (uploaded blobs stay on the Hub and are not sent again on
    the next run).

    Nothing is created on the Hub until there is something to upload: the repo (and the branch) are
    made when the first file is submitted (or at :meth:`finish`). :meth:`check_access` checks the
    token without creating anything, and :meth:`discard` removes a repo or branch this pusher made
    when whatever was producing the files failed before anything was committed.

    Args:
        repo_id: ``"name"`` or ``"namespace/name"``; with ``organization`` and no namespace it becomes
            ``"organization/name"``; with neither, the token's user is the namespace.
        token: a Hub token; ``None`` uses ``HF_TOKEN`` or the one saved by ``hf auth login``.
        endpoint: Hub URL; ``None`` uses ``HF_ENDPOINT`` or huggingface.co.
        private: visibility when the repo is created (an existing repo keeps its own; a warning says so
            when it is public).
        revision: branch to commit to; created from ``main`` when missing.
        commit_message: summary of the commit(s); several commits get " (part i/n)".
        max_files_per_commit: keeps each commit request well under the Hub's commit timeout.
        max_workers: files uploaded at the same time.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        retry: patience for transient failures (5xx, 429, resets).
        delete_patterns: remote files matching these that this push does not bring are deleted in
            its last commit (see :class:`.commits.Committer`). None (default): nothing is deleted.
        delete_if: remote path -> check of its content: deleted in the last commit too when this push
            does not bring it and the check says so (see :class:`.commits.Committer`).
        keep_if: remote path -> check of its content: where it says so, the remote file stays and this push's
            file of that path is not committed (a model card someone edited, see :func:`edited_card_check`).
    """

    def __init__(self, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                 private: bool = False, organization: str | None = None, revision: str | None = None,
                 commit_message: str | None = None, max_files_per_commit: int = 50, max_workers: int = UPLOAD_WORKERS,
                 repo_type: str = "model", retry: RetryPolicy | None = None,
                 delete_patterns: Iterable[str] | None = None,
                 delete_if: Mapping[str, Callable[[bytes], bool]] | None = None,
                 keep_if: Mapping[str, Callable[[bytes], bool]] | None = None):
        if max_files_per_commit < 1 or max_workers < 1:
            raise ValueError("max_files_per_commit and max_workers must be at least 1")
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.api = HfApi(endpoint=endpoint, token=token)
        self.calls = Retrier(retry, token=token, endpoint=self.api.endpoint)
        self.repo = HubRepo(self.api, self.calls, check_target(repo_id, organization, revision), repo_type=repo_type,
                            private=private, revision=revision or "main")
        self.committer = Committer(self.api, self.calls, self.repo, delete_patterns=delete_patterns,
                                   delete_if=delete_if, keep_if=keep_if, num_threads=max_workers)
        self.commit_message = commit_message or "Upload model with streammerge"
        self.max_files_per_commit = max_files_per_commit
        self.max_workers = max_workers
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._setup: Future | None = None  # the repo's preparation; every upload waits for it
        self._result: CommitInfo | None = None
        self._closed = False

    # What the push did, for callers and results.
    @property
    def repo_id(self) -> str:
        return self.repo.repo_id

    @property
    def revision(self) -> str:
        return self.repo.revision

    @property
    def commits(self) -> list[CommitInfo]:
        return self.committer.commits

    @property
    def unchanged(self) -> list[str]:
        return self.committer.unchanged

    @property
    def deleted(self) -> list[str]:
        return self.committer.deleted

    # ---- public API ------------------------------------------------------------------------
    def __enter__(self) -> HubPusher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._result is None:
            self.finish()
        else:
            self.close()

    def submit(self, local_path: str | os.PathLike, path_in_repo: str | None = None, *,
               sha256: str | None = None, size: int | None = None) -> Future[None]:
        """Start uploading a finished file now, in the background; it is committed by :meth:`finish`.

        ``sha256`` (hex) and ``size`` are optional hints from a writer that already knows them: the
        sha256 saves re-reading the file, the size catches a file that is not finished yet. Raises
        :class:`PushError` at once if an earlier upload already failed for good (bad token, ...).
        """
        if self._closed:
            raise RuntimeError("this HubPusher is finished or closed")
        self.calls.raise_fatal()
        local = os.fspath(local_path)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"no such file to upload: {local}")
        on_disk = os.path.getsize(local)
        if size is not None and size != on_disk:
            raise ValueError(f"{local} has {on_disk} bytes on disk but {size} were announced: is it finished?")
        if on_disk > HUB_MAX_FILE_SIZE:
            raise ValueError(f"{local} has {on_disk} bytes; the Hub refuses files over 50 GB: use smaller shards")
        if on_disk > RECOMMENDED_MAX_FILE_SIZE:
            logger.warning("%s has %d bytes; the Hub advises files of at most 5 GB", local, on_disk)
        op = CommitOperationAdd(path_in_repo or os.path.basename(local), local)
        if sha256 is not None:
            op.upload_info.sha256 = bytes.fromhex(sha256)
        pool = self._start()
        future = pool.submit(self._upload, op)
        with self._lock:
            if op.path_in_repo in self._uploads:
                logger.warning("%s was submitted twice; the last one is committed", op.path_in_repo)
            self._uploads[op.path_in_repo] = Upload(local, op, future)
        return future

    def check_access(self) -> str:
        """Check the token now, creating nothing on the Hub; returns the full repo id (see :class:`.repo.HubRepo`)."""
        return self.repo.check_access()

    def discard(self) -> list[str]:
        """Stop without committing, and remove from the Hub what this pusher created, if nothing was committed.

        For a producer that failed (a merge that stopped half-way). Returns what was removed
        (``"repo"``, ``"branch <name>"``); never raises.
        """
        self.close()
        if self._setup is None or self.commits:
            return []
        try:
            self._setup.result()
        except BaseException:  # the setup failed (or never ran): whatever it made is recorded in the repo
            pass
        return self.repo.discard()

    def wait_ready(self) -> str:
        """Create the repo (and branch) now and wait for it; returns the full repo id."""
        self._start()
        assert self._setup is not None
        self._setup.result()
        return self.repo_id

    def finish(self) -> CommitInfo:
        """Wait for every upload, then commit: data files first, index/config/README last.

        Returns the last commit made, or the current head when the Hub already had everything. When an upload
        or a commit fails (or is refused), a branch this pusher made is deleted again where it holds nothing but
        this push's commits, so no half-pushed branch stays; a repo it made stays, with the uploaded files, so
        that running the push again sends nothing twice.
        """
        if self._result is not None:
            return self._result
        if self._closed:
            raise RuntimeError("this HubPusher was closed without finishing")
        self._start()
        try:
            self._wait_uploads()
            with self._lock:
                uploads = dict(self._uploads)
            self._result = self.committer.commit_all(uploads, self.commit_message, self.max_files_per_commit)
            return self._result
        except Exception:  # not KeyboardInterrupt: an interrupted push resumes
            self.repo.discard(own_head=self.commits[-1].oid if self.commits else None, whole_repo=False)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Stop without committing; uploads not started yet are cancelled."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=self._result is not None, cancel_futures=True)

    # ---- background work -------------------------------------------------------------------
    def _start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="streammerge-push")
                # Submitted first, so it runs before any upload; uploads wait for it.
                self._setup = self._pool.submit(self.repo.prepare)
            return self._pool

    def _upload(self, op: CommitOperationAdd) -> None:
        assert self._setup is not None
        if self._setup.exception() is not None or self.calls.fatal is not None:
            return  # finish() reports that error once; nothing to gain from trying this file
        repo = self.repo
        self.calls.call(f"upload {op.path_in_repo}", lambda: self.api.preupload_lfs_files(
            repo.repo_id, [op], revision=repo.revision, repo_type=repo.repo_type, num_threads=1, free_memory=False))

    def _wait_uploads(self) -> None:
        assert self._setup is not None
        futures = [self._setup] + [u.future for u in list(self._uploads.values())]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        self.calls.raise_fatal()
        if errors:
            raise errors[0]


def push_folder(folder: str | os.PathLike, repo_id: str, *, ignore: Iterable[str] = DEFAULT_IGNORE,
                delete_stale: bool = True, **options: Any) -> CommitInfo:
    """Push every file of a finished folder; ``options`` are those of :class:`HubPusher`.

    Files matching ``ignore`` (paths relative to ``folder``, fnmatch style) are left out, so the
    merge's temporary and state files never reach the Hub. A folder that holds model weights
    replaces the weights at the revision, as a merge's push does (``delete_stale``): an earlier
    push's files that match :data:`OWNED_PATTERNS` and are not in the folder are deleted in the last
    commit (a model.safetensors left beside a new sharded index is what transformers would load),
    and so is a README.md an earlier push generated, unedited, where the folder has none.
    """
    from ..sources.hf import INDEX, SINGLE

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    patterns = tuple(ignore) + ALWAYS_IGNORE
    files = [p for p in walk(root) if p.is_file()]
    if delete_stale and any((root / name).is_file() for name in (SINGLE, INDEX)):
        options.setdefault("delete_patterns", OWNED_PATTERNS)
        options.setdefault("delete_if", {"README.md": earlier_card_check(lambda: pusher.repo_id)})
    with HubPusher(repo_id, **options) as pusher:
        for path in files:
            rel = path.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, pat) for pat in patterns):
                pusher.submit(path, rel)
        return pusher.finish()


def edited_card_check(repo_id: Callable[[], str]) -> Callable[[bytes], bool]:
    """The push's check of the README.md it would replace with the card it generated: True (keep it, with a warning)
    for one nobody's push generated untouched: a card edited since, or the repo owner's own README."""

    def check(data: bytes) -> bool:
        state = card_state(data)
        if state == "untouched":
            return False
        what = ("a streammerge model card edited since it was generated" if state == "edited"
                else "not a card a push generated")
        logger.warning("%s: README.md is %s, so it is kept and this push's card is not committed; it may describe an "
                       "earlier upload: update it on the Hub, or delete it there to get a new card", repo_id(), what)
        return True

    return check


def earlier_card_check(repo_id: Callable[[], str]) -> Callable[[bytes], bool]:
    """The push's check of a README.md it does not replace: True (delete it) for a card an earlier push generated
    and nobody edited, which describes that upload and not this one; an edited card stays, with one warning."""
    warned = False

    def check(data: bytes) -> bool:
        nonlocal warned
        state = card_state(data)
        if state == "edited" and not warned:
            warned = True
            logger.warning("%s: README.md is a streammerge model card edited since it was generated (or made before "
                           "cards were marked), so it is kept, but it may describe an earlier upload (step, dtype, "
                           "how to load it): update or delete it on the Hub, or push with a model card to replace it",
                           repo_id())
        return state == "untouched"

    return check
