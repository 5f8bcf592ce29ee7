"""The target repo's lifetime: its full name, the token's right to write there, creation, and removal.

The token is checked before the caller starts hours of work (:meth:`HubRepo.check_access`), but
nothing is created until there is a file to upload (:meth:`HubRepo.prepare`), and a repo or branch
made for a push whose producer then failed is deleted again (:meth:`HubRepo.discard`), so a failed
merge leaves nothing behind on the Hub.
"""

from __future__ import annotations

import logging
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from .retry import PushError, Retrier, first_line

logger = logging.getLogger(__name__)

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


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

        A bad token (401), a read-only token, or a namespace the token's user cannot write to fails
        here (:class:`PushError`), before the caller spends hours producing files.
        """
        user = self.whoami()
        role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
        ns = self.repo_id.split("/")[0]
        orgs = user.get("orgs")
        if role == "read":
            raise self._refused("it is a read-only token")
        names = {str(n).lower() for n in [user.get("name")] + [o.get("name") for o in orgs or [] if isinstance(o, dict)]}
        if role == "write" and isinstance(orgs, list) and ns.lower() not in names:
            raise self._refused(f"{user.get('name')} is not a member of {ns}")
        return self.repo_id

    def _refused(self, why: str) -> PushError:
        ns = self.repo_id.split("/")[0]
        return PushError(self.calls.redact(
            f"The Hub would not let {self.calls.token_source()} write to {self.repo_id} ({why}): check that the "
            f"token has write access (a 'write' token, or a fine-grained token with repo.write on {ns}) and, if "
            f"{ns} is an organization, that you are a member with a write role there"), kind="permission")

    def prepare(self) -> None:
        """Create the repo and the branch when missing, remembering what was created (see :meth:`discard`)."""
        self.whoami()
        if self.calls.call("look up the repo", self.head) is None:
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

    def discard(self) -> list[str]:
        """Delete the repo or branch :meth:`prepare` created, when nothing was committed to it since.

        A created repo goes when it still holds only the Hub's initial commit, a created branch when
        its head has not moved. Returns what was removed (``"repo"``, ``"branch <name>"``). Never
        raises: a failure to clean up is logged, the caller's own error matters more.
        """
        removed: list[str] = []
        try:
            if self.created_repo is not None:
                info = self.api.repo_info(self.repo_id, repo_type=self.repo_type)
                refs = self.api.list_repo_refs(self.repo_id, repo_type=self.repo_type)
                if info.sha == self.created_repo and all(b.target_commit == info.sha for b in refs.branches):
                    self.api.delete_repo(self.repo_id, repo_type=self.repo_type, missing_ok=True)
                    removed.append("repo")
                else:
                    logger.warning("%s was created by this push but has changed since; not deleting it", self.repo_id)
            elif self.created_branch is not None:
                info = self.api.repo_info(self.repo_id, revision=self.revision, repo_type=self.repo_type)
                if info.sha == self.created_branch:
                    self.api.delete_branch(self.repo_id, branch=self.revision, repo_type=self.repo_type)
                    removed.append(f"branch {self.revision}")
        except Exception as exc:
            logger.warning("could not remove the %s this push created on %s: %s",
                           "repo" if self.created_repo else "branch", self.calls.endpoint,
                           self.calls.redact(first_line(exc)))
        if removed:
            logger.info("removed the %s this push had created, as nothing was pushed: %s", " and ".join(removed),
                        self.repo_id)
        return removed

    def _rename(self, repo_id: str) -> None:
        self.repo_id = self.calls.target = repo_id
