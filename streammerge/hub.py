"""Push a Hugging Face model folder to the Hub, file by file, while it is still being written.

The merge hands each output file to :class:`HubPusher` as soon as the file is complete; its content
goes up in the background (``preupload_lfs_files``) while the next file is being produced. Nothing
is visible on the Hub until :meth:`HubPusher.finish`, which commits the data files first and the
files that point at them (``*.index.json``, ``config.json``, ``README.md``) last, so the repo never
shows an index naming a shard it does not have.

Re-running after an interruption sends nothing the Hub already has: the LFS batch API reports blobs
already stored, and ``create_commit`` drops files whose content is unchanged. Transient failures
(5xx, 429, resets) are retried with exponential backoff; a commit whose answer was lost is checked
against the remote before it is sent again, so it is never applied twice.

This module works on files only; it knows nothing about checkpoints or tensors.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import (CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData,
                             get_token)
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils.sha import git_hash

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_IGNORE = (".streammerge/*", "*.streammerge-tmp")
ALWAYS_IGNORE = (".git/*", ".cache/huggingface/*")  # the Hub refuses these folders
# Files that point at other files or describe the repo: committed after everything they refer to.
LAST_PATTERNS = ("*.index.json", "config.json", "README.md")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RECOMMENDED_MAX_FILE_SIZE = 5 * 10**9  # the Hub's advice per file
HUB_MAX_FILE_SIZE = 50 * 10**9  # the Hub refuses bigger files
MAX_RETRY_AFTER = 600.0


class PushError(RuntimeError):
    """A push that cannot go on; the message says what the user should do.

    ``kind`` is one of ``"auth"``, ``"permission"``, ``"xet"``, ``"failed"`` (gave up after retries or
    a non-retryable error). The local folder is never changed by a failed push.
    """

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a call that failed for a transient reason.

    The delay doubles from ``base_delay`` up to ``max_delay``; a ``Retry-After`` header wins.
    huggingface_hub itself already retries single LFS requests a few times; this wraps whole steps.
    """

    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(1.0, 1.1)


def is_last_file(path_in_repo: str) -> bool:
    """True for the files committed last (index, config, model card)."""
    name = PurePosixPath(path_in_repo).name
    return any(fnmatch.fnmatchcase(name, p) for p in LAST_PATTERNS)


def matches(path_in_repo: str, pattern: str) -> bool:
    """Glob match anchored at the repo root: ``*`` and ``?`` stop at ``/``, ``**`` does not; ``dir/`` is ``dir/**``.

    Stricter than huggingface_hub's ``delete_patterns`` (fnmatch, where ``*`` crosses folders), so
    that ``model-*.safetensors`` never reaches into a user's ``extra/model-x.safetensors``.
    """
    return _glob(pattern).fullmatch(path_in_repo) is not None


@functools.lru_cache(maxsize=64)
def _glob(pattern: str) -> re.Pattern:
    if pattern.endswith("/"):
        pattern += "**"
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part)))
    return re.compile("".join(out), re.DOTALL)


def plan_commits(paths: Iterable[str], max_files_per_commit: int) -> list[list[str]]:
    """Split ``paths`` into commits: data files first, index/config/README in the last commit.

    Everything fits in one commit when it can (one atomic change, and commits are rate-limited).
    Otherwise the data files go in batches of ``max_files_per_commit`` and the "last" files after
    them, e.g. 5 shards + index + config with max 3 -> [[s1, s2, s3], [s4, s5], [config, index]].
    """
    if max_files_per_commit < 1:
        raise ValueError("max_files_per_commit must be at least 1")
    paths = sorted(set(paths))
    last = [p for p in paths if is_last_file(p)]
    data = [p for p in paths if not is_last_file(p)]
    if not paths:
        return []
    if len(paths) <= max_files_per_commit:
        return [data + last]
    chunk = max_files_per_commit
    return [data[i:i + chunk] for i in range(0, len(data), chunk)] + \
        [last[i:i + chunk] for i in range(0, len(last), chunk)]


@dataclass
class _Upload:
    local_path: str
    op: CommitOperationAdd
    future: Future


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
        private: visibility when the repo is created (an existing repo keeps its own).
        revision: branch to commit to; created from ``main`` when missing.
        commit_message: summary of the commit(s); several commits get " (part i/n)".
        max_files_per_commit: keeps each commit request well under the Hub's ~60 s commit timeout.
        max_workers: files uploaded at the same time.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        retry: patience for transient failures (5xx, 429, resets).
        delete_patterns: remote files at the revision that match one of these (see :func:`matches`)
            and are not part of this push are deleted in the last commit, as ``upload_folder``'s
            ``delete_patterns`` does (``.gitattributes`` never). None (default): nothing is deleted.
    """

    def __init__(self, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                 private: bool = False, organization: str | None = None, revision: str | None = None,
                 commit_message: str | None = None, max_files_per_commit: int = 50, max_workers: int = 2,
                 repo_type: str = "model", retry: RetryPolicy | None = None,
                 delete_patterns: Iterable[str] | None = None):
        if organization:
            if "/" not in repo_id:
                repo_id = f"{organization}/{repo_id}"
            elif repo_id.split("/")[0] != organization:
                raise ValueError(f"repo_id {repo_id!r} names another namespace than organization {organization!r}")
        if max_files_per_commit < 1 or max_workers < 1:
            raise ValueError("max_files_per_commit and max_workers must be at least 1")
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.private = private
        self.revision = revision or "main"
        self.commit_message = commit_message or "Upload model with streammerge"
        self.max_files_per_commit = max_files_per_commit
        self.max_workers = max_workers
        self.retry = retry or RetryPolicy()
        self.delete_patterns = None if delete_patterns is None else tuple(delete_patterns)
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self._token = token
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.commits: list[CommitInfo] = []
        self.unchanged: list[str] = []  # paths whose content the Hub already had at this revision
        self.deleted: list[str] = []  # remote paths the last commit deleted (delete_patterns)
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._setup: Future | None = None
        self._result: CommitInfo | None = None
        self._fatal: PushError | None = None  # auth/permission/xet: no point trying other files
        self._closed = False
        self._user: dict | None = None  # whoami, once asked
        self._created_repo: str | None = None  # head sha of the repo this pusher created, if it did
        self._created_branch: str | None = None  # head sha of the branch this pusher created, if it did

    # ---- public API ------------------------------------------------------------------------
    def __enter__(self) -> "HubPusher":
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
        self._raise_fatal()
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
            self._uploads[op.path_in_repo] = _Upload(local, op, future)
        return future

    def check_access(self) -> str:
        """Check the token now, creating nothing on the Hub; returns the full repo id.

        A bad token (401), a read-only token, or a namespace the token's user cannot write to fails
        here (:class:`PushError`), before the caller spends hours producing files. The repo itself is
        created only when the first file is submitted.
        """
        user = self._whoami()
        role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
        ns = self.repo_id.split("/")[0]
        orgs = user.get("orgs")
        if role == "read":
            raise self._permission_error("check the token", "it is a read-only token")
        names = {str(n).lower() for n in [user.get("name")] + [o.get("name") for o in orgs or [] if isinstance(o, dict)]}
        if role == "write" and isinstance(orgs, list) and ns.lower() not in names:
            raise self._permission_error("check the token", f"{user.get('name')} is not a member of {ns}")
        return self.repo_id

    def discard(self) -> list[str]:
        """Stop without committing, and remove from the Hub what this pusher created, if nothing was committed.

        For a producer that failed (a merge that stopped half-way): a repo this pusher created is
        deleted when it still holds only the Hub's initial commit, a branch it created when its head
        has not moved. Returns what was removed (``"repo"``, ``"branch <name>"``). Never raises: a
        failure to clean up is logged, the caller's own error matters more.
        """
        self.close()
        removed: list[str] = []
        if self._setup is None or self.commits:
            return removed
        try:
            self._setup.result()
        except BaseException:  # the setup failed (or never ran): whatever it made is recorded below
            pass
        try:
            if self._created_repo is not None:
                info = self.api.repo_info(self.repo_id, repo_type=self.repo_type)
                refs = self.api.list_repo_refs(self.repo_id, repo_type=self.repo_type)
                if info.sha == self._created_repo and all(b.target_commit == info.sha for b in refs.branches):
                    self.api.delete_repo(self.repo_id, repo_type=self.repo_type, missing_ok=True)
                    removed.append("repo")
                else:
                    logger.warning("%s was created by this push but has changed since; not deleting it", self.repo_id)
            elif self._created_branch is not None:
                info = self.api.repo_info(self.repo_id, revision=self.revision, repo_type=self.repo_type)
                if info.sha == self._created_branch:
                    self.api.delete_branch(self.repo_id, branch=self.revision, repo_type=self.repo_type)
                    removed.append(f"branch {self.revision}")
        except Exception as exc:
            logger.warning("could not remove the %s this push created on %s: %s",
                           "repo" if self._created_repo else "branch", self._where(), self._redact(_first_line(exc)))
        if removed:
            logger.info("removed the %s this push had created, as nothing was pushed: %s", " and ".join(removed),
                        self.repo_id)
        return removed

    def wait_ready(self) -> str:
        """Create the repo (and branch) now and wait for it; returns the full repo id.

        A bad token, a missing permission or an unreachable Hub fails here (:class:`PushError`),
        before the caller spends hours producing files that could not be pushed.
        """
        self._start()
        assert self._setup is not None
        self._setup.result()
        return self.repo_id

    def finish(self) -> CommitInfo:
        """Wait for every upload, then commit: data files first, index/config/README last.

        With ``delete_patterns``, the last commit also deletes the remote files that match them and
        were not submitted (listed at the branch head that commit is made on top of), so an index and
        the shards it names are replaced in one step. Returns the last commit made, or the current
        head when the Hub already had everything.
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
            changed = {p: u for p, u in uploads.items() if not _unchanged(u.op)}
            self.unchanged = sorted(set(uploads) - set(changed))
            if self.unchanged:
                logger.info("Hub already has %d of %d files unchanged; not committing them again",
                            len(self.unchanged), len(uploads))
            batches = plan_commits(changed, self.max_files_per_commit)
            if not batches and self.delete_patterns:
                batches = [[]]  # nothing new, but stale files may still have to go
            for i, batch in enumerate(batches, 1):
                message = self.commit_message if len(batches) == 1 else \
                    f"{self.commit_message} (part {i}/{len(batches)})"
                keep = set(uploads) if i == len(batches) and self.delete_patterns else None
                info = self._commit([changed[p] for p in batch], message, keep=keep)
                if info is not None:
                    self.commits.append(info)
            if self.deleted:
                logger.info("deleted %d stale files from %s: %s", len(self.deleted), self.repo_id,
                            ", ".join(self.deleted))
            self._result = self.commits[-1] if self.commits else self._head_commit_info()
            return self._result
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
                self._setup = self._pool.submit(self._prepare_repo)
            return self._pool

    def _whoami(self) -> dict:
        """The token's user (cached); qualifies a bare repo name with the user's namespace."""
        if self._user is None:
            self._user = self._call("check the token", lambda: self.api.whoami())
            if "/" not in self.repo_id:
                self.repo_id = f"{self._user['name']}/{self.repo_id}"
        return self._user

    def _head(self, revision: str | None = None) -> str | None:
        """Head sha of the repo's ``revision`` (default branch when None); None when repo or branch is missing."""
        try:
            return self.api.repo_info(self.repo_id, revision=revision, repo_type=self.repo_type).sha
        except GatedRepoError:
            raise
        except RepositoryNotFoundError:  # RevisionNotFoundError is not one of these
            if revision is None:
                return None
            raise
        except RevisionNotFoundError:
            return None

    def _prepare_repo(self) -> None:
        self._whoami()
        if self._call("look up the repo", self._head) is None:
            url = self._call("create the repo", lambda: self.api.create_repo(
                self.repo_id, private=self.private, repo_type=self.repo_type, exist_ok=True))
            self.repo_id = url.repo_id or self.repo_id
            self._created_repo = self._call("read the new repo", self._head)
        if self.revision != "main" and self._call(f"look up branch {self.revision}",
                                                  lambda: self._head(self.revision)) is None:
            self._call(f"create branch {self.revision}", lambda: self.api.create_branch(
                self.repo_id, branch=self.revision, repo_type=self.repo_type, exist_ok=True))
            self._created_branch = self._call(f"read branch {self.revision}", lambda: self._head(self.revision))

    def _upload(self, op: CommitOperationAdd) -> None:
        assert self._setup is not None
        if self._setup.exception() is not None or self._fatal is not None:
            return  # finish() reports that error once; nothing to gain from trying this file
        self._call(f"upload {op.path_in_repo}", lambda: self.api.preupload_lfs_files(
            self.repo_id, [op], revision=self.revision, repo_type=self.repo_type, num_threads=1,
            free_memory=False))

    def _wait_uploads(self) -> None:
        assert self._setup is not None
        futures = [self._setup] + [u.future for u in list(self._uploads.values())]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if self._fatal is not None:
            raise self._fatal
        if errors:
            raise errors[0]

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    # ---- commits ---------------------------------------------------------------------------
    def _commit(self, uploads: list[_Upload], message: str, keep: set[str] | None = None) -> CommitInfo | None:
        """Commit ``uploads``; with ``keep``, also delete the stale files (``delete_patterns``, not in ``keep``).

        None when there was nothing to commit (no uploads, nothing stale).
        """
        what = f"commit {len(uploads)} files" if keep is None else f"commit {len(uploads)} files and delete stale ones"
        failed_before = False
        sent: list[str] = []  # what the attempt in flight deletes

        def attempt() -> CommitInfo | None:
            nonlocal failed_before, sent
            ops: list[Any] = [u.op for u in uploads]
            parent: str | None = None
            stale: list[str] = []
            if failed_before or keep is not None:
                # The last attempt may have been applied even though its answer was lost: look first.
                # The stale files are listed at the head the commit is then made on top of.
                info = self.api.repo_info(self.repo_id, revision=self.revision, repo_type=self.repo_type,
                                          files_metadata=failed_before)
                stale = self._stale(info.sha, keep) if keep is not None else []
                if failed_before and self._holds(info, uploads) and not stale:
                    logger.info("The commit was applied although its answer was lost; not sending it again")
                    self.deleted = sent
                    return self._commit_info(info.sha, message)
                # On top of the head we saw, so a late landing of the lost attempt (or anyone's commit
                # since we listed the files) makes this one fail (412) instead of applying twice or
                # deleting a file we did not see. Fresh operations: the old ones carry upload state.
                parent = info.sha
                if failed_before:
                    ops = [_fresh_op(u) for u in uploads]
            if not ops and not stale:
                return None
            failed_before, sent = True, stale
            info = self.api.create_commit(self.repo_id, ops + [CommitOperationDelete(p) for p in stale],
                                          commit_message=message, revision=self.revision, repo_type=self.repo_type,
                                          parent_commit=parent, num_threads=self.max_workers)
            failed_before = False
            self.deleted = stale
            return info

        # 412 (or 409): our parent_commit is no longer the head; the next attempt looks again.
        return self._call(what, attempt, retry_status=RETRY_STATUS | {409, 412})

    def _stale(self, head: str, keep: set[str]) -> list[str]:
        """Remote files at ``head`` that match ``delete_patterns`` and are not in ``keep``."""
        assert self.delete_patterns is not None
        files = self.api.list_repo_files(self.repo_id, revision=head, repo_type=self.repo_type)
        return sorted(p for p in files if p not in keep and p != ".gitattributes"
                      and any(matches(p, pat) for pat in self.delete_patterns))

    def _holds(self, info: Any, uploads: list[_Upload]) -> bool:
        """Whether the revision ``info`` (read with files_metadata) holds every upload with our content."""
        remote = {s.rfilename: s for s in info.siblings or []}
        for u in uploads:
            sib = remote.get(u.op.path_in_repo)
            if sib is None:
                return False
            if sib.lfs is not None:
                same = sib.lfs.sha256 == u.op.upload_info.sha256.hex()
            else:
                with open(u.local_path, "rb") as f:
                    same = sib.blob_id == git_hash(f.read())
            if not same:
                return False
        return True

    def _head_commit_info(self) -> CommitInfo:
        info = self._call("read the remote revision", lambda: self.api.repo_info(
            self.repo_id, revision=self.revision, repo_type=self.repo_type))
        return self._commit_info(info.sha, self.commit_message)

    def _commit_info(self, oid: str, message: str) -> CommitInfo:
        endpoint = self.api.endpoint.rstrip("/")
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return CommitInfo(commit_url=f"{endpoint}/{prefix}{self.repo_id}/commit/{oid}",
                          commit_message=message, commit_description="", oid=oid, _endpoint=endpoint)

    # ---- retries and errors ----------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], retry_status: frozenset[int] = RETRY_STATUS) -> T:
        """``fn()``, retried with backoff on transient failures; PushError when it cannot succeed."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                err = self._classify(exc, what)
                if err is not None:
                    self._fatal = self._fatal or err
                    raise err from exc
                if attempt == self.retry.attempts or not _retryable(exc, retry_status):
                    raise self._gave_up(what, attempt, exc) from exc
                self._wait(what, attempt, exc)
        raise AssertionError("unreachable")

    def _wait(self, what: str, attempt: int, exc: BaseException) -> None:
        delay = self.retry.delay(attempt, _retry_after(exc))
        logger.warning("Hub: could not %s (%s); retrying in %.1f s (attempt %d of %d)",
                       what, self._redact(_first_line(exc)), delay, attempt + 1, self.retry.attempts)
        time.sleep(delay)

    def _gave_up(self, what: str, attempts: int, exc: BaseException) -> PushError:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return PushError(self._redact(
            f"Could not {what} on {self._where()}{tries}: {_first_line(exc)}\n"
            "Nothing in the local folder was changed; running the same push again re-sends only what "
            "the Hub does not have yet."))

    def _classify(self, exc: BaseException, what: str) -> PushError | None:
        """A PushError for failures that retrying cannot fix, None otherwise."""
        status = _status(exc)
        if status == 401:
            return PushError(self._redact(
                f"The Hub at {self._where()} did not accept {self._token_source()} (401 Unauthorized) "
                f"while trying to {what}.\n"
                "Log in with `hf auth login`, or set HF_TOKEN to a valid token "
                "(https://huggingface.co/settings/tokens). Note that HF_TOKEN takes precedence over "
                "`hf auth login`."), kind="auth")
        if status == 403:
            return self._permission_error(what)
        if _mentions_xet_missing(exc):
            return PushError(self._redact(
                f"The Hub at {self._where()} does not offer Xet storage (it has no xet-write-token "
                "endpoint), but huggingface_hub uploads through Xet whenever hf_xet is installed.\n"
                "Set HF_HUB_DISABLE_XET=1 in the environment to upload through Git LFS instead."),
                kind="xet")
        return None

    def _permission_error(self, what: str, why: str = "403 Forbidden") -> PushError:
        ns = self.repo_id.split("/")[0] if "/" in self.repo_id else "your namespace"
        return PushError(self._redact(
            f"The Hub refused to let {self._token_source()} write to {self.repo_id} "
            f"({why}) while trying to {what}.\n"
            "Check that the token has write access (a 'write' token, or a fine-grained token with "
            f"write permission on this repo), and, if {ns} is an organization, that you are a member "
            "with write rights there."), kind="permission")

    def _where(self) -> str:
        return (self.api.endpoint or "the Hub").rstrip("/")

    def _token_source(self) -> str:
        if self._token:
            return "the token given to streammerge"
        if os.environ.get("HF_TOKEN"):
            return "the token in HF_TOKEN"
        if get_token():
            return "the token saved by `hf auth login`"
        return "the request (no Hugging Face token was found)"

    def _redact(self, text: str) -> str:
        for token in {self._token, get_token()}:
            if token:
                text = text.replace(token, "***")
        return text


def push_folder(folder: str | os.PathLike, repo_id: str, *, ignore: Iterable[str] = DEFAULT_IGNORE,
                **options: Any) -> CommitInfo:
    """Push every file of a finished folder; ``options`` are those of :class:`HubPusher`.

    Files matching ``ignore`` (paths relative to ``folder``, fnmatch style) are left out, so the
    merge's temporary and state files never reach the Hub.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    patterns = tuple(ignore) + ALWAYS_IGNORE
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with HubPusher(repo_id, **options) as pusher:
        for path in files:
            rel = path.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, pat) for pat in patterns):
                pusher.submit(path, rel)
        return pusher.finish()


def make_model_card(info: Mapping[str, Any]) -> str:
    """A README.md for a merged checkpoint, so users of the repo know where it came from.

    ``info`` keys (all optional): ``repo_id``, ``source`` (checkpoint path), ``step``,
    ``world_size``, ``fsdp_version``, ``dtype``, ``optimizer`` (bool: ``optimizer/`` is included),
    ``optimizer_format`` (``"safetensors"``, the default, or ``"torch"``: how ``optimizer/`` was
    written), ``base_model``, ``license``, ``tags``, ``model_type``.
    """
    repo_id = info.get("repo_id") or "REPO_ID"
    tags = ["streammerge", "verl", "fsdp"] + [t for t in info.get("tags") or [] if t]
    data = ModelCardData(library_name="transformers", base_model=info.get("base_model"),
                         license=info.get("license"), tags=tags)
    facts = [("Source checkpoint", info.get("source")), ("Training step", info.get("step")),
             ("FSDP world size", info.get("world_size")), ("FSDP version", info.get("fsdp_version")),
             ("Model type", info.get("model_type")), ("Weights dtype", info.get("dtype")),
             ("Optimizer state included", "yes" if info.get("optimizer") else "no")]
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in facts if v is not None and v != "")
    body = f"""
# {repo_id.split("/")[-1]}

This model was merged from a veRL FSDP sharded checkpoint with streammerge.

| | |
|---|---|
{rows}

## How to load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```
"""
    if info.get("optimizer"):
        fmt = info.get("optimizer_format") or "safetensors"
        if fmt == "torch":
            what = """`optimizer/optimizer.pt` holds the optimizer state as one torch file (it loads with
`torch.load(..., weights_only=True)`), keyed by parameter name (`state[<param name>][<key>]` and
`param_groups`), as `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` returns the
full state, so training can resume on any world size:"""
        elif fmt == "safetensors":
            what = """`optimizer/` holds the optimizer state as safetensors (with `optimizer.safetensors.index.json`), in
the flattened form of `torch.distributed.checkpoint.state_dict`
(`state.<param name>.<key>`, `param_groups.<param name>.<key>`), so training can resume on any
world size:"""
        else:
            raise ValueError(f"optimizer_format {fmt!r}: expected 'safetensors' or 'torch'")
        body += f"""
## Optimizer state

{what}

```python
from huggingface_hub import snapshot_download
from streammerge import load_optimizer_state_dict

local = snapshot_download("{repo_id}", allow_patterns=["optimizer/*"])
optim_state = load_optimizer_state_dict(f"{{local}}/optimizer")

# then, with your model and optimizer built:
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
set_optimizer_state_dict(model, optimizer, optim_state,
                         options=StateDictOptions(flatten_optimizer_state_dict=True))
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


# ---- helpers -------------------------------------------------------------------------------
def _chain(exc: BaseException | None) -> Iterable[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x/2.x speak HTTP through httpx2 (or httpx), older ones through requests.
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


def _status(exc: BaseException) -> int | None:
    """HTTP status of the first error in the chain that carries a response."""
    for e in _chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _retry_after(exc: BaseException) -> float | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if response is not None and hasattr(response, "headers"):
            value = response.headers.get("Retry-After")
            if value is not None and value.strip().isdigit():
                return float(value)
    return None


def _retryable(exc: BaseException, retry_status: frozenset[int] = RETRY_STATUS) -> bool:
    status = _status(exc)
    if status is not None:
        return status in retry_status
    # Resets, timeouts, refused connections: from httpx, or from hf_xet as a builtin ConnectionError.
    return any(isinstance(e, TRANSPORT_ERRORS) for e in _chain(exc))


def _mentions_xet_missing(exc: BaseException) -> bool:
    return any("xet-write-token" in str(e) and ("404" in str(e) or "Not Found" in str(e)) for e in _chain(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])


def _unchanged(op: CommitOperationAdd) -> bool:
    # Upload state that preupload_lfs_files leaves on the operation (private in huggingface_hub):
    # the remote oid at this path. If a future version drops it, create_commit still skips no-ops.
    remote = getattr(op, "_remote_oid", None)
    try:
        return remote is not None and remote == op._local_oid
    except AttributeError:
        return False


def _fresh_op(upload: _Upload) -> CommitOperationAdd:
    op = CommitOperationAdd(upload.op.path_in_repo, upload.local_path)
    if upload.op.upload_info.is_hashed:
        op.upload_info.sha256 = upload.op.upload_info.sha256
    return op
