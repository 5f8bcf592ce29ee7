"""A small Hugging Face Hub look-alike for tests, served on 127.0.0.1.

It speaks the part of the Hub protocol that the real ``huggingface_hub`` client uses to push with
Xet disabled (see ``shared/docs/hub-protocol.md``): whoami, repo creation, preupload, the LFS batch
API with basic and multipart transfers, NDJSON commits, branches (created and deleted), repo
deletion, revision info, file listing (tree) and file download (enough for ``snapshot_download``).
There is deliberately no Xet endpoint, like a Hub without Xet: a client with Xet on fails on it.

Tests drive it with the real client and then look at its state (repos, commits, blobs) and at the
request log. Tokens (``/api/whoami-v2`` describes them as the Hub does, and writes are refused
with 403 as the Hub refuses them): WRITE_TOKEN (classic write) and READ_TOKEN (classic read) belong
to "alice", who has the write role in org "acme"; OTHER_TOKEN (classic write) to "bob", in no org;
ORG_READER_TOKEN (classic write) to "carol", who has the read role in "acme"; FINE_TOKEN is a
fine-grained token of "alice" with repo.write on "acme" only (alice's own namespace: read only).
Anything else gets 401. Fault knobs act on the next requests whose path
matches a regex: ``fail_next`` (status, optional Retry-After), ``drop_response`` /
``drop_after_commit`` (handled, then connection reset), ``reset_next`` (reset, not handled),
``hang`` (held until ``release()``, then reset), ``before_next`` (run a callback first)::

    @pytest.fixture
    def hub():
        with HubServer() as server:
            yield server

    def test_x(hub):
        hub.fail_next(r"/commit/", status=503)
        api = HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN)   # with HF_HUB_DISABLE_XET on
        ...
        assert hub.file_bytes("alice/m", "config.json") == b"..."
        assert [e.status for e in hub.requests("POST", r"/commit/")] == [503, 200]
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

WRITE_TOKEN = "hf_streammergeTestWriteTokenAlice0001"
READ_TOKEN = "hf_streammergeTestReadTokenAlice0002"
OTHER_TOKEN = "hf_streammergeTestWriteTokenBob00003"
ORG_READER_TOKEN = "hf_streammergeTestWriteTokenCarol004"
FINE_TOKEN = "hf_streammergeTestFineTokenAlice00005"

# Fine-grained permissions that let a token write to the repos of an entity (the Hub's names).
WRITE_PERMISSIONS = frozenset({"repo.write", "repo.content.write"})
ORG_WRITE_ROLES = frozenset({"contributor", "write", "admin"})


@dataclass(frozen=True)
class TokenInfo:
    user: str
    role: str  # "read", "write" or "fineGrained"
    # fine-grained only: (entity type "user"/"org"/"model"/..., entity name, permissions) per scope
    scoped: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def permissions(self, namespace: str, repo_id: str | None = None) -> set[str]:
        """A fine-grained token's permissions on ``namespace`` (or on the repo ``repo_id``)."""
        return {p for etype, name, perms in self.scoped for p in perms
                if (etype in ("user", "org") and name == namespace) or (repo_id is not None and name == repo_id)}


DEFAULT_TOKENS = {
    WRITE_TOKEN: TokenInfo("alice", "write"),
    READ_TOKEN: TokenInfo("alice", "read"),
    OTHER_TOKEN: TokenInfo("bob", "write"),
    ORG_READER_TOKEN: TokenInfo("carol", "write"),
    FINE_TOKEN: TokenInfo("alice", "fineGrained", (("user", "alice", ("repo.content.read",)),
                                                   ("org", "acme", ("repo.content.read", "repo.write")))),
}
DEFAULT_ORGS = {"acme": {"alice": "write", "carol": "read"}}  # org -> member -> role in the org

# What a new repo on the Hub gets in its first commit; these names go to LFS.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.npy",
                "*.npz", "*.gguf", "*.zip", "*.tar", "*.gz", "*.pkl", "*.model", "tokenizer.json")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_SIZE_LIMIT = 10 * 1024 * 1024  # bigger files go to LFS whatever their name, as on the Hub

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _check_card_metadata(card: bytes) -> None:
    """The Hub refuses a commit whose README.md metadata is invalid: `base_model` must be model ids (a path is
    not one). Only the id's form is checked here (by huggingface_hub's own rule), not that such a model exists."""
    from huggingface_hub import RepoCard
    from huggingface_hub.utils import validate_repo_id

    try:
        data = RepoCard(card.decode()).data.to_dict()
    except Exception as e:
        raise HttpError(400, f"Invalid metadata in README.md: {e}") from None
    base = data.get("base_model")
    ids = base if isinstance(base, list) else [base] if base is not None else []
    for i in ids:
        try:
            validate_repo_id(i)
        except Exception:
            raise HttpError(400, f'Invalid metadata in README.md: "base_model" with value {i!r} is not valid. '
                                 "Use a model id from https://hf.co/models.") from None


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git sha1 of the content (regular) or of the LFS pointer (lfs)

    def sibling(self, path: str, blobs: bool) -> dict:
        out: dict[str, Any] = {"rfilename": path}
        if blobs:
            out.update(size=self.size, blobId=self.blob_id)
            if self.lfs:
                out["lfs"] = {"size": self.size, "sha256": self.sha256,
                              "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    added: list[str]
    deleted: list[str]
    tree: dict[str, FileEntry]
    time: float = field(default_factory=time.monotonic)


@dataclass
class Repo:
    type: str
    namespace: str
    name: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)


@dataclass
class LogEntry:
    """One request as the server saw it; ``status`` is None when the connection was dropped."""
    t_start: float
    t_end: float
    method: str
    path: str
    status: int | None
    body_size: int


@dataclass
class Fault:
    pattern: re.Pattern
    method: str | None
    # "status": answer with an error; "drop": handle, then reset instead of answering;
    # "reset": reset without handling; "hang": wait for release() before the body, then reset;
    # "call": run callback, then handle normally.
    action: str
    times: int
    skip: int = 0
    status: int = 500
    retry_after: int | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    max_wait: float = 60.0
    callback: Callable[[], object] | None = None

    def release(self) -> None:
        """Let a held ("hang") request go on: its connection is then dropped, nothing stored."""
        self.released.set()

    def kill_when_entered(self, proc, timeout: float) -> None:
        """SIGKILL a client process once it is stuck in this held request, then let the server go on."""
        try:
            assert self.entered.wait(timeout), proc.communicate(timeout=5)
            proc.kill()
            proc.wait(10)
        finally:
            self.release()
            if proc.poll() is None:
                proc.kill()


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Drop(Exception):
    """Close the connection without answering."""


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a killed push process resets its idle keep-alive connections) is no error of
        this server's; anything else is printed as socketserver does."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class HubServer:
    """In-process Hub-compatible server; use as a context manager (``with HubServer() as hub``)."""

    def __init__(self, tokens: dict[str, TokenInfo] | None = None,
                 orgs: dict[str, dict[str, str] | set[str]] | None = None, multipart_chunk_size: int = 1024 * 1024):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        # org -> {member: role}; a set of members gives each the write role
        self.orgs = {k: dict(v) if isinstance(v, dict) else dict.fromkeys(v, "write")
                     for k, v in (DEFAULT_ORGS if orgs is None else orgs).items()}
        self.multipart_chunk_size = multipart_chunk_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.log: list[LogEntry] = []
        self.errors: list[str] = []  # unexpected exceptions while handling a request
        self._parts: dict[tuple[str, int], tuple[bytes, str]] = {}
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for fault in self._faults:
            fault.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- fault knobs -----------------------------------------------------------------------
    def _add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail_next(self, pattern: str, n: int = 1, status: int = 500, method: str | None = None,
                  retry_after: int | None = None, skip: int = 0) -> Fault:
        """Answer the next ``n`` requests whose path matches ``pattern`` with ``status``."""
        return self._add_fault(Fault(re.compile(pattern), method, "status", n, skip, status, retry_after))

    def drop_response(self, pattern: str, n: int = 1, method: str | None = None, skip: int = 0) -> Fault:
        """Handle the next ``n`` matching requests fully, then reset the connection instead of answering."""
        return self._add_fault(Fault(re.compile(pattern), method, "drop", n, skip))

    def drop_after_commit(self, n: int = 1) -> Fault:
        """Apply the next ``n`` commits but let the client see a connection reset."""
        return self.drop_response(r"/commit/", n=n, method="POST")

    def reset_next(self, pattern: str, n: int = 1, method: str | None = None, skip: int = 0) -> Fault:
        """Read the next ``n`` matching requests, then reset the connection without handling them."""
        return self._add_fault(Fault(re.compile(pattern), method, "reset", n, skip))

    def before_next(self, pattern: str, action: Callable[[], object], n: int = 1, method: str | None = None,
                    skip: int = 0) -> Fault:
        """Run ``action()`` just before handling the next ``n`` matching requests (e.g. a rival commit)."""
        return self._add_fault(Fault(re.compile(pattern), method, "call", n, skip, callback=action))

    def hang(self, pattern: str, n: int = 1, method: str | None = None, skip: int = 0,
             max_wait: float = 60.0) -> Fault:
        """Hold the next matching request before reading its body; on ``release()`` drop it unhandled.

        ``fault.entered`` is set once a request is being held, so a test can act (kill the client) then.
        """
        return self._add_fault(Fault(re.compile(pattern), method, "hang", n, skip, max_wait=max_wait))

    def clear_faults(self) -> None:
        with self._lock:
            for fault in self._faults:
                fault.release()
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        # Faults are tried in the order they were added; the first that matches takes the request
        # (``skip`` counts only the requests a fault saw).
        with self._lock:
            for fault in self._faults:
                if fault.times <= 0 or (fault.method and fault.method != method) or not fault.pattern.search(path):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.times -= 1
                return fault
        return None

    # ---- state helpers for tests -----------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def commit_log(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision``, oldest first."""
        repo = self.repo(repo_id, repo_type)
        out, commit = [], repo.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out[::-1]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, FileEntry]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        assert commit is not None, f"no revision {revision}"
        return dict(commit.tree)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return self.blobs[self.files(repo_id, revision, repo_type)[path].sha256]

    def requests(self, method: str | None = None, pattern: str | None = None) -> list[LogEntry]:
        with self._lock:
            return [e for e in self.log if (method is None or e.method == method)
                    and (pattern is None or re.search(pattern, e.path))]

    # ---- auth ------------------------------------------------------------------------------
    def _user(self, headers: Any) -> TokenInfo | None:
        auth = headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        info = self.tokens.get(token)
        if info is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return info

    def _can_write_ns(self, user: TokenInfo | None, namespace: str, repo_id: str | None = None) -> None:
        """403 unless the token may write to ``namespace`` (or to the repo ``repo_id`` there), as on the Hub."""
        if user is None:
            raise HttpError(401, "You must be authenticated to write to the Hub")
        if user.role == "read":
            raise HttpError(403, "You don't have the rights to write with this token: it is a read token")
        if namespace != user.user:
            role = self.orgs.get(namespace, {}).get(user.user)
            if role is None:
                raise HttpError(403, f"You don't have the rights to write to the namespace {namespace}")
            if role not in ORG_WRITE_ROLES:
                raise HttpError(403, f"You have the {role} role in {namespace}, which cannot write")
        if user.role == "fineGrained" and not user.permissions(namespace, repo_id) & WRITE_PERMISSIONS:
            raise HttpError(403, f"This fine-grained token has no write permission on {repo_id or namespace}")

    def _get_repo(self, user: TokenInfo | None, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is not None and repo.private:
            ns = repo.namespace
            if user is None or (ns != user.user and user.user not in self.orgs.get(ns, ())):
                repo = None
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if write:
            self._can_write_ns(user, repo.namespace, repo.repo_id)
        return repo

    @staticmethod
    def _revision(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ---- operations ------------------------------------------------------------------------
    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((str(self._counter), *parts)).encode()).hexdigest()

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(sha, data)
        return sha

    def _regular_entry(self, data: bytes) -> FileEntry:
        return FileEntry(self._store_blob(data), len(data), False, git_blob_sha1(data))

    def _apply_commit(self, repo: Repo, branch: str, summary: str, description: str,
                      added: dict[str, FileEntry], deleted: list[str], parent_commit: str | None = None) -> Commit:
        head = repo.branches.get(branch)
        if head is None:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if parent_commit is not None and parent_commit != head:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[head].tree) if head else {}
        for path in deleted:
            for p in [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]:
                del tree[p]
        tree.update(added)
        commit = Commit(self._new_oid(repo.repo_id, head or "", summary), head, summary, description,
                        list(added), deleted, tree)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def add_files(self, repo_id: str, files: dict[str, bytes], summary: str = "add files",
                  revision: str = "main", repo_type: str = "model") -> Commit:
        """Commit regular files directly (to set up a repo that already has content)."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            added = {path: self._regular_entry(data) for path, data in files.items()}
            return self._apply_commit(repo, revision, summary, "", added, [])

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Make a repo directly (as if made earlier on the Hub), with the Hub's initial commit."""
        with self._lock:
            ns, name = repo_id.split("/")
            repo = Repo(repo_type, ns, name, private)
            repo.branches["main"] = ""
            self._apply_commit(repo, "main", "initial commit", "",
                               {".gitattributes": self._regular_entry(GITATTRIBUTES)}, [])
            self.repos[(repo_type, repo_id)] = repo
            return repo


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # Every method goes through one dispatcher.
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_HEAD = do_DELETE = do_GET

    # ---- plumbing --------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line:
                    raise _Drop()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _Drop()
                chunks.append(chunk)
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            raise _Drop()
        return data

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        body = body or b""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        """Reset the connection (RST, no answer), as a proxy or a crashed server would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _dispatch(self) -> None:
        hub = self.hub
        t0 = time.monotonic()
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body_size = 0

        def log(status: int | None) -> None:
            # Logged before answering, so a client that has its answer always finds it in the log.
            with hub._lock:
                hub.log.append(LogEntry(t0, time.monotonic(), self.command, path, status, body_size))

        fault = hub._take_fault(self.command, path)
        try:
            if fault is not None and fault.action == "hang":
                fault.entered.set()
                fault.released.wait(fault.max_wait)
                raise _Drop()
            body = self._read_body()
            body_size = len(body)
            if fault is not None and fault.action == "reset":
                raise _Drop()
            if fault is not None and fault.action == "call":
                fault.callback()
            if fault is not None and fault.action == "status":
                log(fault.status)
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                self._send(fault.status, {"error": f"injected failure {fault.status}"}, headers)
                return
            try:
                status, payload, headers, ctype = self._route(path, query, body)
            except HttpError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                status, payload, ctype = err.status, {"error": err.message, **err.extra}, "application/json"
            if fault is not None and fault.action == "drop":
                raise _Drop()
            log(status)
            self._send(status, payload, headers, ctype)
        except (TimeoutError, _Drop, ConnectionError):
            log(None)
            self._drop()
        except Exception as exc:  # a bug in this server: answer 500 and keep it for the test to see
            hub.errors.append(f"{self.command} {path}: {exc!r}")
            log(500)
            self._send(500, {"error": f"hubserver bug: {exc!r}"})

    def _route(self, path: str, query: dict, body: bytes) -> tuple[int, Any, dict, str]:
        hub = self.hub
        method = self.command
        segs = [unquote(s) for s in path.strip("/").split("/")]
        with hub._lock:
            user = hub._user(self.headers)
        if path == "/api/whoami-v2" and method == "GET":
            if user is None:
                raise HttpError(401, "Invalid credentials in Authorization header")
            return 200, self._whoami(user), {}, "application/json"
        if path == "/api/repos/create" and method == "POST":
            return 200, self._create_repo(user, json.loads(body or b"{}")), {}, "application/json"
        if path == "/api/repos/delete" and method == "DELETE":
            return 200, self._delete_repo(user, json.loads(body or b"{}")), {}, "application/json"
        if path == "/api/validate-yaml" and method == "POST":
            return 200, {"errors": [], "warnings": []}, {}, "application/json"
        if segs[0] == "_lfs":
            return self._lfs_transfer(segs[1:], body)
        if segs[0] == "api" and len(segs) >= 4 and segs[1] in REPO_TYPES:
            return self._repo_api(user, REPO_TYPES[segs[1]], f"{segs[2]}/{segs[3]}", segs[4:], query, body)
        # /{prefix}{ns}/{name}.git/info/lfs/objects/batch and /{prefix}{ns}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if segs[0] in ("datasets", "spaces"):
            repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
        if len(segs) >= 3 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(user, repo_type, f"{segs[0]}/{segs[1][:-4]}", json.loads(body))
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(user, repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HttpError(404, f"Not found: {method} {path}")

    # ---- endpoints -------------------------------------------------------------------------
    def _whoami(self, user: TokenInfo) -> dict:
        """What the Hub answers: the user, its orgs with the user's role in each, and the token's role
        (fine-grained tokens list their permissions per entity)."""
        def entity(kind: str, name: str) -> dict:
            return {"id": hashlib.sha1(f"{kind}:{name}".encode()).hexdigest()[:24], "name": name,
                    "fullname": name.title(), "avatarUrl": f"/avatars/{name}.svg"}

        orgs = [{**entity("org", o), "type": "org", "email": None, "canPay": False, "periodEnd": None,
                 "roleInOrg": members[user.user]}
                for o, members in self.hub.orgs.items() if user.user in members]
        token: dict[str, Any] = {"displayName": f"{user.role} token", "role": user.role,
                                 "createdAt": "2026-01-01T00:00:00.000Z"}
        if user.role == "fineGrained":
            token["fineGrained"] = {
                "canReadGatedRepos": False, "global": ["discussion.write", "post.write"],
                "scoped": [{"entity": {"_id": entity(kind, name)["id"], "type": kind, "name": name},
                            "permissions": list(perms)} for kind, name, perms in user.scoped]}
        return {**entity("user", user.user), "type": "user", "email": f"{user.user}@example.com",
                "emailVerified": True, "isPro": False, "canPay": False, "periodEnd": None, "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": token}}

    def _create_repo(self, user: TokenInfo | None, payload: dict) -> dict:
        hub = self.hub
        repo_type = payload.get("type") or "model"
        with hub._lock:
            if user is None:
                raise HttpError(401, "You must be authenticated to create a repo")
            ns = payload.get("organization") or user.user
            repo_id = f"{ns}/{payload['name']}"
            hub._can_write_ns(user, ns, repo_id)
            url = f"{hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                raise HttpError(409, f"You already created this {repo_type} repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            hub.create_repo(repo_id, repo_type, private)
        return {"url": url, "name": repo_id, "id": repo_id}

    def _delete_repo(self, user: TokenInfo | None, payload: dict) -> dict:
        hub = self.hub
        repo_type = payload.get("type") or "model"
        with hub._lock:
            if user is None:
                raise HttpError(401, "You must be authenticated to delete a repo")
            repo_id = f"{payload.get('organization') or user.user}/{payload['name']}"
            hub._get_repo(user, repo_type, repo_id, write=True)
            del hub.repos[(repo_type, repo_id)]
        return {}

    def _repo_api(self, user: TokenInfo | None, repo_type: str, repo_id: str, rest: list[str],
                  query: dict, body: bytes) -> tuple[int, Any, dict, str]:
        hub = self.hub
        method = self.command
        action = rest[0] if rest else ""
        if action == "xet-write-token" or action == "xet-read-token":
            raise HttpError(404, "Not found: this Hub has no Xet storage")
        with hub._lock:
            if method == "GET" and action in ("", "revision"):
                repo = hub._get_repo(user, repo_type, repo_id)
                commit = hub._revision(repo, rest[1] if action == "revision" else "main")
                blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
                return 200, {
                    "id": repo_id, "modelId": repo_id, "author": repo.namespace, "sha": commit.oid,
                    "private": repo.private, "disabled": False, "gated": False,
                    "siblings": [e.sibling(p, blobs) for p, e in sorted(commit.tree.items())],
                }, {}, "application/json"
            if method == "POST" and action == "preupload":
                repo = hub._get_repo(user, repo_type, repo_id, write=True)
                commit = hub._revision(repo, rest[1])
                return 200, {"files": [self._preupload_one(commit, f) for f in json.loads(body)["files"]]}, \
                    {}, "application/json"
            if method == "POST" and action == "commit":
                repo = hub._get_repo(user, repo_type, repo_id, write=True)
                return 200, self._commit(repo, rest[1], body), {}, "application/json"
            if method == "POST" and action == "branch":
                repo = hub._get_repo(user, repo_type, repo_id, write=True)
                branch = rest[1]
                if branch in repo.branches:
                    raise HttpError(409, f"Reference refs/heads/{branch} already exists")
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                repo.branches[branch] = hub._revision(repo, start).oid
                return 200, {}, {}, "application/json"
            if method == "DELETE" and action == "branch":
                repo = hub._get_repo(user, repo_type, repo_id, write=True)
                branch = rest[1]
                if branch not in repo.branches:
                    raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HttpError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return 200, {}, {}, "application/json"
            if method == "GET" and action == "tree":  # what snapshot_download lists (no pagination)
                repo = hub._get_repo(user, repo_type, repo_id)
                commit = hub._revision(repo, rest[1])
                return 200, self._tree(commit, "/".join(rest[2:]), query), {}, "application/json"
            if method == "GET" and action == "refs":
                repo = hub._get_repo(user, repo_type, repo_id)
                return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                                          for b, oid in repo.branches.items()], "tags": [], "converts": []}, \
                    {}, "application/json"
        raise HttpError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    @staticmethod
    def _tree(commit: Commit, prefix: str, query: dict) -> list[dict]:
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if base and not any(p.startswith(base) for p in commit.tree):
            raise HttpError(404, f"Entry not found: {prefix}", "EntryNotFound")
        files, folders = [], set()
        for path, entry in sorted(commit.tree.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                                   "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
                files.append(item)
        return [{"type": "directory", "oid": git_blob_sha1(f.encode()), "size": 0, "path": f}
                for f in sorted(folders)] + files

    def _preupload_one(self, commit: Commit, f: dict) -> dict:
        path, size = f["path"], int(f["size"])
        sample = base64.b64decode(f.get("sample") or "")
        name = path.rsplit("/", 1)[-1]
        lfs = size > LFS_SIZE_LIMIT or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)
        existing = commit.tree.get(path)
        oid = None
        if existing is not None:
            oid = existing.sha256 if existing.lfs else existing.blob_id
        return {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}

    def _commit(self, repo: Repo, rev: str, body: bytes) -> dict:
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        added: dict[str, FileEntry] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HttpError(400, "Only base64 file content is supported")
                added[value["path"]] = hub._regular_entry(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                oid, size = value["oid"], value.get("size")
                blob = hub.blobs.get(oid)
                if blob is None or (size is not None and len(blob) != int(size)):
                    raise HttpError(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                         f"does not exist: {value['path']} ({oid})")
                added[value["path"]] = FileEntry(oid, len(blob), True, git_blob_sha1(lfs_pointer(oid, len(blob))))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HttpError(400, f"Unknown commit operation {key}")
        if rev not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if "README.md" in added and not added["README.md"].lfs:
            _check_card_metadata(hub.blobs[added["README.md"].sha256])
        commit = hub._apply_commit(repo, rev, header.get("summary", ""), header.get("description", ""),
                                   added, deleted, header.get("parentCommit"))
        return {"commitUrl": f"{hub.endpoint}/{URL_PREFIX[repo.type]}{repo.repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid, "pullRequestUrl": None}

    def _lfs_batch(self, user: TokenInfo | None, repo_type: str, repo_id: str, payload: dict):
        hub = self.hub
        with hub._lock:
            hub._get_repo(user, repo_type, repo_id, write=payload.get("operation") == "upload")
            base = hub.endpoint
            objects = []
            chunk = hub.multipart_chunk_size
            for obj in payload["objects"]:
                oid, size = obj["oid"], int(obj["size"])
                out: dict[str, Any] = {"oid": oid, "size": size}
                if not re.fullmatch(r"[0-9a-f]{64}", oid):
                    out["error"] = {"code": 422, "message": "oid must be a sha256"}
                elif oid not in hub.blobs:
                    verify = {"href": f"{base}/_lfs/verify/{oid}"}
                    if size > chunk:
                        nparts = -(-size // chunk)
                        header = {"chunk_size": str(chunk)}
                        header.update({str(i): f"{base}/_lfs/part/{oid}/{i}" for i in range(1, nparts + 1)})
                        out["actions"] = {"upload": {"href": f"{base}/_lfs/complete/{oid}", "header": header},
                                          "verify": verify}
                    else:
                        out["actions"] = {"upload": {"href": f"{base}/_lfs/upload/{oid}"}, "verify": verify}
                objects.append(out)
        return 200, {"transfer": "basic", "objects": objects}, {}, "application/vnd.git-lfs+json"

    def _lfs_transfer(self, rest: list[str], body: bytes):
        hub = self.hub
        kind, oid = rest[0], rest[1]
        method = self.command
        with hub._lock:
            if kind == "upload" and method == "PUT":
                if hashlib.sha256(body).hexdigest() != oid:
                    raise HttpError(400, "Uploaded content does not match its sha256")
                hub.blobs[oid] = body
                return 200, b"", {}, "text/plain"
            if kind == "part" and method == "PUT":
                etag = hashlib.md5(body).hexdigest()
                hub._parts[(oid, int(rest[2]))] = (body, etag)
                return 200, b"", {"ETag": f'"{etag}"'}, "text/plain"
            if kind == "complete" and method == "POST":
                parts = sorted(json.loads(body)["parts"], key=lambda p: p["partNumber"])
                data = []
                for p in parts:
                    stored = hub._parts.get((oid, p["partNumber"]))
                    if stored is None or stored[1] != p["etag"].strip('"'):
                        raise HttpError(400, f"Part {p['partNumber']} is missing or its ETag does not match")
                    data.append(stored[0])
                blob = b"".join(data)
                if hashlib.sha256(blob).hexdigest() != oid:
                    raise HttpError(400, "Assembled content does not match its sha256")
                hub.blobs[oid] = blob
                for p in parts:
                    hub._parts.pop((oid, p["partNumber"]), None)
                return 200, {}, {}, "application/json"
            if kind == "verify" and method == "POST":
                size = int(json.loads(body)["size"])
                if oid not in hub.blobs or len(hub.blobs[oid]) != size:
                    raise HttpError(404, "Object not found", "EntryNotFound")
                return 200, {}, {}, "application/json"
        raise HttpError(404, "Not found")

    def _resolve(self, user: TokenInfo | None, repo_type: str, repo_id: str, rev: str, path: str):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(user, repo_type, repo_id)
            commit = hub._revision(repo, rev)
            entry = commit.tree.get(path)
            if entry is None:
                raise HttpError(404, f"Entry not found: {path}", "EntryNotFound")
            data = hub.blobs[entry.sha256]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.sha256 if entry.lfs else entry.blob_id}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size})
        return 200, data, headers, "application/octet-stream"

