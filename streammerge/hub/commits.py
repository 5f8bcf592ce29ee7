"""Commits of a push: in a safe order, each applied once, stale files of an earlier push deleted with the last.

Data files are committed first and the files that point at them (``*.index.json``, ``config.json``,
``README.md``) last, all in one commit, so the repo never shows an index naming a shard it does not have.
When the first commits of a push of several would make the revision load something that is neither the
earlier model nor this one (see :meth:`Committer._to_hide`), its first commit also deletes the files that
make the revision loadable (index, config, card) and its last commit writes them again: the commits in
between hold no loadable model, rather than a model made of two training steps. Before anything is
committed, a model push is refused where the revision holds files a loader would read with it that the
push neither brings nor deletes (a peft adapter's config, another model's tokenizer, weights an earlier
push left). A commit whose answer was lost is checked against the remote before it is sent again, and a
retry is made on top of the head it checked, so it is never applied twice and never deletes a file it
did not see.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.utils.sha import git_hash

from ..model_folder import MODEL_FILE_PATTERNS
from ..options import UPLOAD_WORKERS
from ..sources.hf import INDEX, SINGLE
from .repo import HubRepo
from .retry import RETRY_STATUS, PushError, Retrier, status_of

ADAPTER_CONFIG = "adapter_config.json"  # peft's: at a repo's top, transformers loads the repo as an adapter
CONFIG = "config.json"
# The files transformers loads a model's weights from, at the top of a repo: model.safetensors before any index.
WEIGHT_PATTERNS = (SINGLE, "model-*-of-*.safetensors", INDEX)
# What else transformers reads beside a model's config and weights: the tokenizer and the generation settings
# (what a merge carries from huggingface/, less config.json and the remote code only config.json's auto_map names).
READ_BESIDE = tuple(p for p in MODEL_FILE_PATTERNS if p not in (CONFIG, "*.py"))

logger = logging.getLogger(__name__)

# Files that point at other files or describe the repo: committed after everything they refer to.
LAST_PATTERNS = ("*.index.json", "config.json", "README.md")
# Answers to a commit that say it was not applied: its parent is no longer the head (412), or a conflict.
REFUSED = frozenset({409, 412})


def is_last_file(path_in_repo: str) -> bool:
    """True for the files committed last (index, config, model card)."""
    name = PurePosixPath(path_in_repo).name
    return any(fnmatch.fnmatchcase(name, p) for p in LAST_PATTERNS)


def is_weight_file(path_in_repo: str) -> bool:
    """True for the top-level files transformers loads weights from (model.safetensors, shards, their index)."""
    return any(matches(path_in_repo, p) for p in WEIGHT_PATTERNS)


def read_beside(path_in_repo: str) -> bool:
    """True for a top-level file transformers reads with a model's weights (tokenizer, generation config)."""
    return "/" not in path_in_repo and any(fnmatch.fnmatchcase(path_in_repo, p) for p in READ_BESIDE)


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
    The "last" files go in one commit whatever their number (a few small files): a config committed
    before its index would load beside the weights an earlier push left until that index came.
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
    return [data[i:i + chunk] for i in range(0, len(data), chunk)] + ([last] if last else [])


@dataclass
class Upload:
    """A submitted file: where it is, its commit operation (which carries the upload state), its upload."""

    local_path: str
    op: CommitOperationAdd
    future: Future


def unchanged(op: CommitOperationAdd) -> bool:
    """Whether the Hub already holds this content at this path (as preupload found out)."""
    # Upload state that preupload_lfs_files leaves on the operation (private in huggingface_hub):
    # the remote oid at this path. If a future version drops it, create_commit still skips no-ops.
    remote = getattr(op, "_remote_oid", None)
    try:
        return remote is not None and remote == op._local_oid
    except AttributeError:
        return False


class Committer:
    """Makes the commits of one push to ``repo``'s branch and remembers what they did.

    ``delete_patterns``: remote files at the branch head that match one of these (see
    :func:`matches`) and are not part of the push are deleted in its last commit, as
    ``upload_folder``'s ``delete_patterns`` does (``.gitattributes`` never). None: nothing is deleted.
    ``delete_if``: remote path -> check of its content; a file there that is not part of the push is
    deleted with them when the check of its content at that head says so (e.g. a model card an
    earlier push generated and nobody edited since). ``keep_if``: remote path -> check of its content; where
    it says so, the remote file stays and the push's file of that path is left out (a card someone edited).
    """

    def __init__(self, api: HfApi, calls: Retrier, repo: HubRepo, *, delete_patterns: Iterable[str] | None = None,
                 delete_if: Mapping[str, Callable[[bytes], bool]] | None = None,
                 keep_if: Mapping[str, Callable[[bytes], bool]] | None = None, num_threads: int = UPLOAD_WORKERS):
        self.api = api
        self.calls = calls
        self.repo = repo
        self.delete_patterns = None if delete_patterns is None else tuple(delete_patterns)
        self.delete_if = dict(delete_if or {})
        self.keep_if = dict(keep_if or {})
        self.kept: list[str] = []  # remote files kept in place of this push's (keep_if)
        self.num_threads = num_threads
        self.commits: list[CommitInfo] = []
        self.unchanged: list[str] = []  # paths whose content the Hub already had at this revision
        self.deleted: list[str] = []  # stale remote paths deleted (by the last commit, or the first that hid them)

    def commit_all(self, uploads: dict[str, Upload], message: str, max_files_per_commit: int) -> CommitInfo:
        """Commit ``uploads`` (path in repo -> finished upload) in the order of :func:`plan_commits`.

        Files the Hub already holds unchanged are left out (listed in ``unchanged``) but still count
        as part of the push for stale-file deletion. Several commits get " (part i/n)" after
        ``message``. Returns the last commit made, or the current head when nothing was committed.
        """
        remote = functools.cache(self._remote_files)  # listed once, and only where something asks
        if self.repo.repo_type == "model" and any(p in uploads for p in (CONFIG, SINGLE, INDEX)):
            # a model: refused where what else the revision holds would load with it
            self._refuse_foreign(uploads, remote())
        for path, check in self.keep_if.items():
            if path in uploads and path in remote() and check(self.calls.call(
                    f"read {path}", functools.partial(self._read, path, self.repo.revision))):
                self.kept.append(path)
        changed = {p: u for p, u in uploads.items() if not unchanged(u.op) and p not in self.kept}
        batches = plan_commits(changed, max_files_per_commit)
        deletes = bool(self.delete_patterns or self.delete_if)
        if not batches and deletes:
            batches = [[]]  # nothing new, but stale files may still have to go
        sent = {p: u for p, u in uploads.items() if p not in self.kept}  # a kept file is not hidden for a while either
        hide = self._to_hide(batches, sent, remote()) if len(batches) > 1 else []
        again = [p for p in hide if p in sent and p not in changed]  # hidden though unchanged: written again last
        if again:  # fresh operations: huggingface_hub leaves out one whose upload found the content there
            changed.update((p, Upload(sent[p].local_path, _fresh_op(sent[p]), sent[p].future)) for p in again)
            batches = plan_commits(changed, max_files_per_commit)
        self.unchanged = sorted(set(uploads) - set(changed) - set(self.kept))
        if self.unchanged:
            logger.info("Hub already has %d of %d files unchanged; not committing them again",
                        len(self.unchanged), len(uploads))
        hidden: list[str] = []
        for i, batch in enumerate(batches, 1):
            part = message if len(batches) == 1 else f"{message} (part {i}/{len(batches)})"
            keep = set(uploads) if i == len(batches) and deletes else None
            info = self.commit([changed[p] for p in batch], part, keep=keep, hide=hide if i == 1 else ())
            if info is not None:
                self.commits.append(info)
            if i == 1 and len(batches) > 1:
                hidden = [p for p in self.deleted if p not in sent]  # stale entry points the first commit took
        self.deleted = sorted(set(self.deleted) | set(hidden))
        if self.deleted:
            logger.info("deleted %d stale files from %s: %s", len(self.deleted), self.repo.repo_id,
                        ", ".join(self.deleted))
        return self.commits[-1] if self.commits else self._head_commit_info(message)

    def _remote_files(self) -> set[str]:
        """The files at the revision before this push commits: what else would load with a model push, a file in
        keep_if, and what several commits must hide are all judged from this one listing."""
        repo = self.repo
        return set(self.calls.call("list the remote files", lambda: self.api.list_repo_files(
            repo.repo_id, revision=repo.revision, repo_type=repo.repo_type)))

    def _deletes(self, path: str) -> bool:
        """Whether the last commit deletes ``path`` when this push does not bring it (``delete_patterns``)."""
        return any(matches(path, p) for p in self.delete_patterns or ())

    def _refuse_foreign(self, uploads: Mapping[str, Upload], remote: set[str]) -> None:
        """PushError (nothing committed) where the revision holds files a loader would read with the pushed model
        that this push neither brings nor deletes: a peft adapter's config (transformers loads the repo as that
        adapter), another model's config.json (under a --weights-only push), tokenizer or generation config, or
        weight files an earlier push left (kept by
        ``delete_patterns=None``: a model.safetensors transformers loads before the pushed index, an index and shards
        beside a pushed model.safetensors, or shards the pushed index does not name, which loaders that read every
        ``*.safetensors`` take)."""
        repo = self.repo
        where = f"{repo.repo_id} (revision {repo.revision})"
        if ADAPTER_CONFIG not in uploads and ADAPTER_CONFIG in remote:
            raise PushError(f"{where} holds {ADAPTER_CONFIG} at its top, which would make transformers load it as a "
                            "peft adapter instead of the pushed model; nothing was committed: delete that file from "
                            "the repo (or push to another repo or --revision)", kind="conflict")
        others = sorted(p for p in remote if p not in uploads and (read_beside(p) or p == CONFIG))
        weights = sorted(p for p in remote if p not in uploads and is_weight_file(p) and not self._deletes(p)) \
            if SINGLE in uploads or INDEX in uploads else []
        if not others and not weights:
            return
        kinds = " and ".join(k for k, has in (("config", CONFIG in others), ("tokenizer or generation settings",
                                                                          set(others) - {CONFIG})) if has)
        what = [f"{', '.join(others)} (another model's {kinds})"] if others else []
        what += [f"{', '.join(weights)} (weights an earlier push left, kept by delete_stale=False)"] if weights else []
        fix = "delete them from the repo" + (", push with delete_stale=True" if weights else "")
        raise PushError(f"{where} holds {' and '.join(what)}, which this push does not bring and transformers or "
                        f"another loader would read with the pushed model; nothing was committed: {fix}, or push to "
                        "another repo or --revision", kind="conflict")

    def _to_hide(self, batches: list[list[str]], sent: Mapping[str, Upload], remote: set[str]) -> list[str]:
        """The remote files the first of several commits deletes, so that no commit before the last loads a model that
        is neither the earlier one nor this push's: the index, config and card this push writes again last, and the
        weight entry points it deletes then as stale. None where the earlier model stays whole until the last commit.

        Hidden where an earlier commit overwrites a remote file (shards of the same names: the old index over a mix
        of two steps), adds tokenizer or generation files (read with the old weights), adds model.safetensors beside
        remote weights (transformers loads it before any index, with the old config), or adds shards beside a remote
        model.safetensors (loaders that read every ``*.safetensors`` of a folder without an index take both); and
        always on a branch this push made, which starts as main's copy: main's model must not load under the
        branch's name, nor a mix of it with this push.
        """
        early = {p for batch in batches[:-1] for p in batch}
        if not (self.repo.created_branch is not None or early & remote or any(read_beside(p) for p in early)
                or (SINGLE in early and (SINGLE in remote or INDEX in remote))
                or (SINGLE in remote and any(is_weight_file(p) for p in early))):
            return []
        return sorted(p for p in remote if (p in sent and is_last_file(p))
                      or (p in (SINGLE, INDEX) and p not in sent and self._deletes(p)))

    def commit(self, uploads: list[Upload], message: str, keep: set[str] | None = None,
               hide: Iterable[str] = ()) -> CommitInfo | None:
        """Commit ``uploads``; with ``keep``, also delete the stale files (``delete_patterns``, not in ``keep``);
        ``hide``: remote files to delete in the same commit (those still at the head).

        None when there was nothing to commit (no uploads, nothing stale).
        """
        hide = tuple(hide)
        repo = self.repo
        self.deleted = []
        what = f"commit {len(uploads)} files" if keep is None else f"commit {len(uploads)} files and delete stale ones"
        failed_before = False
        maybe_applied = False  # the last attempt failed without a refusal: the Hub may have applied it
        sent: list[str] = []  # what the attempt in flight deletes

        def attempt() -> CommitInfo | None:
            nonlocal failed_before, maybe_applied, sent
            ops: list[Any] = [u.op for u in uploads]
            parent: str | None = None
            stale: list[str] = []
            gone: list[str] = []
            if failed_before or keep is not None or hide:
                # The last attempt may have been applied even though its answer was lost: look first.
                # The stale files are listed at the head the commit is then made on top of.
                info = self.api.repo_info(repo.repo_id, revision=repo.revision, repo_type=repo.repo_type,
                                          files_metadata=maybe_applied)
                head = _sha(info)
                stale = self._stale(head, keep) if keep is not None else []
                present = {sib.rfilename for sib in getattr(info, "siblings", None) or []}
                gone = [p for p in hide if p in present]
                if maybe_applied and self._holds(info, uploads) and not stale and not gone:
                    logger.info("The commit was applied although its answer was lost; not sending it again")
                    self.deleted = [p for p in sent if p not in present]
                    return self._commit_info(head, message)
                # On top of the head we saw, so a late landing of the lost attempt (or anyone's commit
                # since we listed the files) makes this one fail (412) instead of applying twice or
                # deleting a file we did not see. Fresh operations: the old ones carry upload state.
                parent = head
                if failed_before:
                    ops = [_fresh_op(u) for u in uploads]
            if not ops and not stale and not gone:
                return None
            failed_before, maybe_applied, sent = True, True, stale + gone
            try:
                commit = self.api.create_commit(repo.repo_id, ops + [CommitOperationDelete(p) for p in stale + gone],
                                              commit_message=message, revision=repo.revision,
                                              repo_type=repo.repo_type, parent_commit=parent,
                                              num_threads=self.num_threads)
            except Exception as exc:
                maybe_applied = status_of(exc) not in REFUSED  # a refused commit changed nothing
                raise
            failed_before = maybe_applied = False
            self.deleted = stale + gone
            return commit

        # 412 (or 409): our parent_commit is no longer the head; the next attempt looks again.
        return self.calls.call(what, attempt, retry_status=RETRY_STATUS | REFUSED)

    def _stale(self, head: str, keep: set[str]) -> list[str]:
        """Remote files at ``head`` that are not in ``keep`` and match ``delete_patterns`` or pass ``delete_if``."""
        files = self.api.list_repo_files(self.repo.repo_id, revision=head, repo_type=self.repo.repo_type)
        stale = {p for p in files if p not in keep and p != ".gitattributes"
                 and any(matches(p, pat) for pat in self.delete_patterns or ())}
        stale.update(p for p, check in self.delete_if.items()
                     if p in files and p not in keep and p not in stale and check(self._read(p, head)))
        return sorted(stale)

    def _read(self, path: str, head: str) -> bytes:
        """The content of ``path`` at commit ``head`` (a small file: it is downloaded whole)."""
        repo = self.repo
        with tempfile.TemporaryDirectory(prefix="streammerge-") as tmp:
            local = self.api.hf_hub_download(repo.repo_id, path, revision=head, repo_type=repo.repo_type,
                                             local_dir=tmp)
            return Path(local).read_bytes()

    @staticmethod
    def _holds(info: Any, uploads: list[Upload]) -> bool:
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

    def _head_commit_info(self, message: str) -> CommitInfo:
        repo = self.repo
        sha = self.calls.call("read the remote revision", lambda: _sha(self.api.repo_info(
            repo.repo_id, revision=repo.revision, repo_type=repo.repo_type)))
        return self._commit_info(sha, message)

    def _commit_info(self, oid: str, message: str) -> CommitInfo:
        endpoint = self.api.endpoint.rstrip("/")
        return CommitInfo(commit_url=f"{self.repo.url}/commit/{oid}", commit_message=message, commit_description="",
                          oid=oid, _endpoint=endpoint)


def _fresh_op(upload: Upload) -> CommitOperationAdd:
    op = CommitOperationAdd(upload.op.path_in_repo, upload.local_path)
    if upload.op.upload_info.is_hashed:
        op.upload_info.sha256 = upload.op.upload_info.sha256
    return op


def _sha(info: Any) -> str:
    """The commit a repo_info answer is at (the Hub always sends it; a server that does not is refused)."""
    if not isinstance(info.sha, str):
        raise PushError("the Hub did not say which commit the repository is at")
    return info.sha
