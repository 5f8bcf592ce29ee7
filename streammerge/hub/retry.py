"""Hub calls that survive a flaky network, and failures a user can act on.

Transient failures (5xx, 429, resets, timeouts) are retried with exponential backoff, honouring
``Retry-After``; huggingface_hub itself retries single LFS requests a few times, this wraps whole
steps. Failures no retry can fix (a bad token, no write permission, a Hub without Xet) become a
:class:`PushError` at once, with the fix in the message. A token never appears in a message.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from huggingface_hub import get_token
from huggingface_hub.errors import LocalTokenNotFoundError

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 600.0
TOKENS_URL = "https://huggingface.co/settings/tokens"


class PushError(RuntimeError):
    """A push that cannot go on; the message (one line) says what the user should do.

    ``kind`` is one of ``"auth"``, ``"permission"``, ``"xet"``, ``"conflict"`` (the repo holds a file that would
    make it load as something else), ``"failed"`` (gave up after retries or a non-retryable error). The local
    folder is never changed by a failed push.
    """

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a call that failed for a transient reason.

    The delay doubles from ``base_delay`` up to ``max_delay``; a ``Retry-After`` header wins.
    """

    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(1.0, 1.1)


class Retrier:
    """Runs the Hub calls of one push: retries what may pass, turns the rest into a one-line PushError.

    The first failure no retry can fix is kept in ``fatal``, so that the other upload threads stop
    instead of each finding it out again. ``target`` is what messages name as the destination.
    """

    def __init__(self, policy: RetryPolicy | None = None, *, token: str | None = None, endpoint: str | None = None,
                 target: str = "the repo"):
        self.policy = policy or RetryPolicy()
        self.token = token
        self.endpoint = (endpoint or "the Hub").rstrip("/")
        self.target = target
        self.fatal: PushError | None = None

    def call(self, what: str, fn: Callable[[], T], retry_status: frozenset[int] = RETRY_STATUS) -> T:
        """``fn()``, retried with backoff on transient failures; PushError when it cannot succeed."""
        for attempt in range(1, self.policy.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                err = self.classify(exc, what)
                if err is not None:
                    self.fatal = self.fatal or err
                    raise err from exc
                if attempt == self.policy.attempts or not retryable(exc, retry_status):
                    raise self.gave_up(what, attempt, exc) from exc
                self._wait(what, attempt, exc)
        raise AssertionError("unreachable")

    def raise_fatal(self) -> None:
        if self.fatal is not None:
            raise self.fatal

    def _wait(self, what: str, attempt: int, exc: BaseException) -> None:
        delay = self.policy.delay(attempt, retry_after(exc))
        logger.warning("Hub: could not %s (%s); retrying in %.1f s (attempt %d of %d)",
                       what, self.redact(first_line(exc)), delay, attempt + 1, self.policy.attempts)
        time.sleep(delay)

    def gave_up(self, what: str, attempts: int, exc: BaseException) -> PushError:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return PushError(self.redact(
            f"Could not {what} on {self.endpoint}{tries}: {first_line(exc)}; nothing in the local folder was "
            "changed, and running the same push again re-sends only what the Hub does not have yet"))

    def classify(self, exc: BaseException, what: str) -> PushError | None:
        """A PushError for failures that retrying cannot fix, None otherwise."""
        if isinstance(exc, LocalTokenNotFoundError):  # raised before any request: nothing to retry
            return PushError(f"There is no Hugging Face token to {what} on {self.endpoint}: log in with "
                             f"`hf auth login`, or set HF_TOKEN to a token with write access ({TOKENS_URL})",
                             kind="auth")
        status = status_of(exc)
        if status == 401:
            return PushError(self.redact(
                f"The Hub at {self.endpoint} did not accept {self.token_source()} (401 Unauthorized) while trying "
                f"to {what}: log in with `hf auth login`, or set HF_TOKEN to a valid token ({TOKENS_URL}); "
                "HF_TOKEN takes precedence over `hf auth login`"), kind="auth")
        if status == 403:
            return self.permission_error(what)
        if mentions_xet_missing(exc):
            return PushError(self.redact(
                f"The Hub at {self.endpoint} does not offer Xet storage (it has no xet-write-token endpoint), but "
                "huggingface_hub uploads through Xet whenever hf_xet is installed: set HF_HUB_DISABLE_XET=1 in the "
                "environment to upload through Git LFS instead"), kind="xet")
        return None

    def permission_error(self, what: str) -> PushError:
        """The Hub answered 403 although the token looked fine: say what to check."""
        ns = self.target.split("/")[0] if "/" in self.target else "your namespace"
        return PushError(self.redact(
            f"The Hub refused to let {self.token_source()} write to {self.target} (403 Forbidden) while trying to "
            f"{what}: check that the token has write access (a 'write' token, or a fine-grained token with "
            f"repo.write on {ns}) and, if {ns} is an organization, that you are a member with a write role there"),
            kind="permission")

    def token_source(self) -> str:
        if self.token:
            return "the token given to streammerge"
        if os.environ.get("HF_TOKEN"):
            return "the token in HF_TOKEN"
        if get_token():
            return "the token saved by `hf auth login`"
        return "the request (no Hugging Face token was found)"

    def redact(self, text: str) -> str:
        for token in {self.token, get_token()}:
            if token:
                text = text.replace(token, "***")
        return text


# ---- reading an exception ----------------------------------------------------------------------
def chain(exc: BaseException | None) -> Iterable[BaseException]:
    """``exc`` and its causes/contexts, each once."""
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


def status_of(exc: BaseException) -> int | None:
    """HTTP status of the first error in the chain that carries a response."""
    for e in chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def retry_after(exc: BaseException) -> float | None:
    for e in chain(exc):
        response = getattr(e, "response", None)
        if response is not None and hasattr(response, "headers"):
            value = response.headers.get("Retry-After")
            if value is not None and value.strip().isascii() and value.strip().isdigit():
                return float(value)
    return None


def retryable(exc: BaseException, retry_status: frozenset[int] = RETRY_STATUS) -> bool:
    status = status_of(exc)
    if status is not None:
        return status in retry_status
    # Resets, timeouts, refused connections: from httpx, or from hf_xet as a builtin ConnectionError.
    return any(isinstance(e, TRANSPORT_ERRORS) for e in chain(exc))


def mentions_xet_missing(exc: BaseException) -> bool:
    return any("xet-write-token" in str(e) and ("404" in str(e) or "Not Found" in str(e)) for e in chain(exc))


def first_line(exc: BaseException) -> str:
    """The gist of an exception on one line (huggingface_hub's messages run over several)."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])
