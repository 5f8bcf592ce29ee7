"""The target repo's lifetime: its full name, the token's right to write there, creation, and removal.

The token is checked before the caller starts hours of work (:meth:`HubRepo.check_access`), but
nothing is created until there is a file to upload (:meth:`HubRepo.prepare`), and a repo or branch
made for a push whose producer then failed is deleted again (:meth:`HubRepo.discard`), so a failed
merge leaves nothing behind on the Hub.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from .retry import TOKENS_URL, PushError, Retrier, first_line

logger = logging.getLogger(__name__)

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO_NAME_MAX = 96  # the Hub's limit on the name part of a repo id
# Fine-grained token permissions that allow writing to the repos of a user or organization.
WRITE_PERMISSIONS = frozenset({"repo.write", "repo.content.write"})
# Roles in an organization that may push: "contributor" only to repos the user created there.
ORG_WRITE_ROLES = frozenset({"contributor", "write", "admin"})


def qualify(repo_id: str, organization: str | None) -> str:
    """``organization/name`` for a bare ``name`` with an organization; ``repo_id`` otherwise.

    A bare name without an organization stays bare: the token's user becomes its namespace once
    the token is known (:meth:`HubRepo.whoami`).
    """
    if not organization:
        return repo_id
    if "/" not in repo_id:
        return f"{organization}/{repo_id}"
    if repo_id.split("/")[0] != organization:
        raise ValueError(f"repo_id {repo_id!r} names another namespace than organization {organization!r}")
    return repo_id


_BAD_REF = re.compile(r"(^[-/.])|(\.\.)|([\x00-\x20~^:?*\[\\\x7f])|(@\{)|(/\.)|(//)|([/.]$)|(\.lock$)")


def check_target(repo_id: str, organization: str | None, revision: str | None) -> str:
    """The repo id to push to (see :func:`qualify`), or ValueError (one line) for a repo id or branch the Hub
    refuses: found before any merge, not after hours of it."""
    from huggingface_hub.utils import validate_repo_id

    full = qualify(repo_id, organization)
    try:
        validate_repo_id(full)
    except ValueError as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"repo id {full!r} is not valid on the Hub: {why}") from None
    if revision is not None and (not revision or _BAD_REF.search(revision) or revision.startswith("refs/")
                                 or re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise ValueError(f"revision {revision!r} is not a branch name a push can create or commit to (a commit "
                         "sha, a ref path or a name git refuses); give a branch name such as 'main' or 'step-500'")
    return full


def write_refusal(user: Mapping[str, Any], repo_id: str) -> tuple[str, str] | None:
    """Why the token that ``user`` (a whoami-v2 answer) describes cannot write to ``repo_id``, or None.

    Returns ``(where, why)``, e.g. ``("organization acme", "carol has the read-only 'read' role in
    acme")``. It reads the token's ``role`` ("read" writes nowhere; "write" writes where the user
    may; "fineGrained" only where one of its ``scoped`` entries grants repo.write), the user's
    ``orgs`` and the user's ``roleInOrg`` in each. What whoami does not say is left to the Hub
    (which still answers 403): None means "as far as the token tells".
    """
    name = str(user.get("name") or "")
    ns = repo_id.split("/")[0]
    token = (user.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    orgs = {str(o.get("name")).lower(): o for o in user.get("orgs") or [] if isinstance(o, Mapping)}
    own = ns.lower() == name.lower()
    if own:
        where = repo_id
    elif ns.lower() in orgs:
        where = f"organization {ns}"
    else:
        where = ns
    if role == "read":
        return where, "read-only token"
    if not own and isinstance(user.get("orgs"), list):
        org = orgs.get(ns.lower())
        if org is None:
            return where, f"{name} is not a member of {ns}"
        org_role = org.get("roleInOrg")
        if org_role is not None and org_role not in ORG_WRITE_ROLES:
            return where, f"{name} has the read-only {org_role!r} role in {ns}"
    if role == "fineGrained":
        fine = token.get("fineGrained") or {}
        granted = set(fine.get("global") or [])
        for scope in fine.get("scoped") or []:
            entity = scope.get("entity") or {}
            target = str(entity.get("name") or "").lower()
            if (target == ns.lower() and entity.get("type") in ("user", "org")) or target == repo_id.lower():
                granted.update(scope.get("permissions") or [])
        if not granted & WRITE_PERMISSIONS:
            return where, f"fine-grained token without repo.write on {ns}"
    return None


def _advice(user: Mapping[str, Any], repo_id: str, why: str) -> str:
    """What to do about a refusal from :func:`write_refusal`."""
    ns = repo_id.split("/")[0]
    name = user.get("name")
    if why == "read-only token":
        return f"create a token with write access at {TOKENS_URL}, then set HF_TOKEN or run `hf auth login`"
    if why.startswith("fine-grained"):
        return (f"give the token write access to the repos of {ns} (repo.write) at {TOKENS_URL}, or use a "
                "'write' token")
    if " role in " in why:
        return (f"a token needs write access there: ask an admin of {ns} for the contributor or write role, or "
                f"push to your own namespace ({name}/...)")
    return (f"a token needs write access there: push to your own namespace ({name}/...), or to an organization "
            "where you have a write role (--organization)")


def repo_name_for(folder: str | os.PathLike) -> str:
    """A valid Hub repo name made from a folder's name, as transformers' ``push_to_hub`` names a repo.

    Anything but ASCII letters, digits, ``_``, ``-`` and ``.`` becomes ``-``; ``--`` and ``..``
    (refused by the Hub) collapse, the ends are trimmed to a letter or digit, a ``.git`` ending is
    dropped and the name is cut to 96 characters: ``"My Model (v2)"`` -> ``"My-Model-v2"``.
    Raises ValueError when nothing usable is left.
    """
    raw = os.path.basename(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", raw))
    name = re.sub(r"\.{2,}", ".", name)
    previous = None
    while name != previous:
        previous = name
        name = name.strip("-.")
        name = name[:-len(".git")] if name.endswith(".git") else name
        name = name[:REPO_NAME_MAX]
    if not name:
        raise ValueError(f"{raw!r} gives no valid Hub repo name (letters, digits, '-', '_', '.'); give --repo-id NAME")
    return name


class HubRepo:
    """One repo and branch on the Hub as a push sees it: named, checked, created on demand, discarded.

    Args:
        api: the client (endpoint and token).
        calls: retries and error messages for this push.
        repo_id: ``"name"`` or ``"namespace/name"`` (see :func:`qualify`).
        private: visibility when the repo is created (an existing repo keeps its own).
        revision: the branch; created from ``main`` when missing.
    """

    def __init__(self, api: HfApi, calls: Retrier, repo_id: str, *, repo_type: str = "model", private: bool = False,
                 revision: str = "main"):
        self.api = api
        self.calls = calls
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.private = private
        self.revision = revision
        self.user: dict | None = None  # whoami, once asked
        self.created_repo: str | None = None  # head sha of the repo this push created, if it did
        self.created_branch: str | None = None  # head sha of the branch this push created, if it did
        self._visibility_told = False
        calls.target = repo_id

    @property
    def url(self) -> str:
        return f"{self.api.endpoint.rstrip('/')}/{URL_PREFIX[self.repo_type]}{self.repo_id}"

    def whoami(self) -> dict:
        """The token's user (asked once); qualifies a bare repo name with the user's namespace."""
        if self.user is None:
            self.user = self.calls.call("check the token", lambda: self.api.whoami())
            if "/" not in self.repo_id:
                self._rename(f"{self.user['name']}/{self.repo_id}")
        return self.user

    def check_access(self) -> str:
        """Check the token now, creating nothing on the Hub; returns the full repo id.

        A bad token (401), a read-only token, a namespace the user may not write to, or a
        fine-grained token without write permission there fails here (:class:`PushError`, one line),
        before the caller spends hours producing files (see :func:`write_refusal`).
        """
        user = self.whoami()
        refusal = write_refusal(user, self.repo_id)
        if refusal is not None:
            where, why = refusal
            raise PushError(self.calls.redact(
                f"token of user {user.get('name')} cannot write to {where} ({why}); "
                f"{_advice(user, self.repo_id, why)}"), kind="permission")
        if self.private:
            self._warn_if_public(self.calls.call("look up the repo", self.info))
        return self.repo_id

    def _warn_if_public(self, info: Any | None) -> None:
        """Say so (once) when a private repo was asked for but the repo exists and is public: it stays public."""
        if not self.private or self._visibility_told or info is None or getattr(info, "private", None) is not False:
            return
        self._visibility_told = True
        kind = "" if self.repo_type == "model" else f" --type {self.repo_type}"
        logger.warning("%s exists and is public; streammerge does not change the visibility of an existing repo "
                       "(--private applies only to a repo it creates), so this push goes to a public repo; to make "
                       "it private, run `hf repos settings %s --private%s`, use the repo's Settings page on the Hub, "
                       "or call HfApi().update_repo_settings(%r, private=True)",
                       self.repo_id, self.repo_id, kind, self.repo_id)

    def prepare(self) -> None:
        """Create the repo and the branch when missing, remembering what was created (see :meth:`discard`)."""
        self.whoami()
        info = self.calls.call("look up the repo", self.info)
        self._warn_if_public(info)
        if info is None:
            url = self.calls.call("create the repo", lambda: self.api.create_repo(
                self.repo_id, private=self.private, repo_type=self.repo_type, exist_ok=True))
            self._rename(url.repo_id or self.repo_id)
            self.created_repo = self.calls.call("read the new repo", self.head)
        if self.revision != "main" and self.calls.call(f"look up branch {self.revision}",
                                                       lambda: self.head(self.revision)) is None:
            self.calls.call(f"create branch {self.revision}", lambda: self.api.create_branch(
                self.repo_id, branch=self.revision, repo_type=self.repo_type, exist_ok=True))
            self.created_branch = self.calls.call(f"read branch {self.revision}", lambda: self.head(self.revision))

    def head(self, revision: str | None = None) -> str | None:
        """Head sha of ``revision`` (the default branch when None); None when the repo or branch is missing."""
        info = self.info(revision)
        return None if info is None else info.sha

    def info(self, revision: str | None = None) -> Any | None:
        """The repo's info at ``revision`` (the default branch when None); None when the repo or branch is missing."""
        try:
            return self.api.repo_info(self.repo_id, revision=revision, repo_type=self.repo_type)
        except GatedRepoError:
            raise
        except RepositoryNotFoundError:  # RevisionNotFoundError is not one of these
            if revision is None:
                return None
            raise
        except RevisionNotFoundError:
            return None

    def discard(self, *, own_head: str | None = None, whole_repo: bool = True) -> list[str]:
        """Delete the repo or branch :meth:`prepare` created, when nothing was committed to it since.

        A created repo goes when it still holds only the Hub's initial commit (never with ``whole_repo=False``:
        its uploaded files are kept for a rerun), a created branch when its head has not moved or is at
        ``own_head`` (the last commit of the push that made it: nobody else committed there). Returns what was
        removed (``"repo"``, ``"branch <name>"``). Never raises: a failure to clean up is logged, the caller's own
        error matters more.
        """
        removed: list[str] = []
        try:
            if self.created_repo is not None and whole_repo:
                info = self.api.repo_info(self.repo_id, repo_type=self.repo_type)
                refs = self.api.list_repo_refs(self.repo_id, repo_type=self.repo_type)
                if info.sha == self.created_repo and all(b.target_commit == info.sha for b in refs.branches):
                    self.api.delete_repo(self.repo_id, repo_type=self.repo_type, missing_ok=True)
                    removed.append("repo")
                else:
                    logger.warning("%s was created by this push but has changed since; not deleting it", self.repo_id)
            elif self.created_branch is not None:
                info = self.api.repo_info(self.repo_id, revision=self.revision, repo_type=self.repo_type)
                if info.sha in (self.created_branch, own_head):
                    self.api.delete_branch(self.repo_id, branch=self.revision, repo_type=self.repo_type)
                    removed.append(f"branch {self.revision}")
                else:
                    logger.warning("branch %s of %s was created by this push but has changed since; not deleting it",
                                   self.revision, self.repo_id)
        except Exception as exc:
            logger.warning("could not remove the %s this push created on %s: %s",
                           "repo" if self.created_repo else "branch", self.calls.endpoint,
                           self.calls.redact(first_line(exc)))
        if removed:
            logger.info("removed the %s this push had created, as the push did not complete: %s",
                        " and ".join(removed), self.repo_id)
        return removed

    def _rename(self, repo_id: str) -> None:
        self.repo_id = self.calls.target = repo_id
