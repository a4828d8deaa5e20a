"""A small, careful HTTP client for CVAT's REST API (2.x; checked against real 2.23.1 captures).

- One pooled ``requests.Session``; a (connect, read) timeout on every call.
- Retries with exponential backoff + full jitter on connection errors, cut-off bodies, 429 and 5xx,
  honouring ``Retry-After``; then a :class:`ServerUnavailable` naming the call.
- Speaks CVAT's media type (``Accept: application/vnd.cvat+json``; ``application/json`` gets a 406).
- Auth: Personal Access Token (``Bearer``), legacy API key (``Token``; from ``/api/auth/login`` when a
  user name and password are configured) or HTTP Basic. Credentials never appear in log lines,
  exception texts or reprs, and are never sent to another host than the configured server.
- CVAT's four error body shapes (``{"detail"}``, a bare list, a bare string, plain text/HTML) become
  one readable message.
- Task creation (:meth:`CvatClient.create_task`, :meth:`~CvatClient.upload_task_images`,
  :meth:`~CvatClient.delete_task`): calls that create something are never repeated once the server may have
  acted on them (see :meth:`CvatClient._send`).
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from cvat_sync.config import Settings

log = logging.getLogger(__name__)

CVAT_JSON = "application/vnd.cvat+json"
USER_AGENT = "cvat_sync/0.1 (wbc-annotator)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SORTING_METHODS = ("lexicographical", "natural", "predefined", "random")  # DataRequest.sorting_method
OCTET_STREAM = "application/octet-stream"


class CvatError(RuntimeError):
    """A CVAT call failed; ``str()`` is a message for the user (no credentials in it)."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotCvatError(CvatError):
    exit_code = 2


class AuthError(CvatError):
    exit_code = 3


class AccessDenied(CvatError):
    exit_code = 3


class NotFound(CvatError):
    exit_code = 4


class ServerUnavailable(CvatError):
    exit_code = 5


class OutcomeUnknown(CvatError):
    """A call that creates something broke off after the request may have reached the server (the connection
    dropped, the answer was cut off, a proxy's 5xx). It was not repeated, since CVAT may have acted on it:
    look before trying again (e.g. delete a half-made task)."""

    exit_code = 5


class TaskCreateError(CvatError):
    """CVAT refused to create a task or its data (a 400, with the server's reason), or the creation request
    ended ``failed`` (with the server's message), or did not finish in time."""


class TooLarge(CvatError):
    """A response body grew past the limit it was given (a hostile or broken server); nothing is kept."""

    exit_code = 6  # an answer refused as unsafe, like pull's PullError

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


# Bodies are read at most this big (counted as they arrive, whatever Content-Length says), so a hostile server
# cannot make a pull hold gigabytes in memory: a frame (PIL refuses bigger images anyway), a JSON answer (a big
# task's annotations are tens of MB).
MAX_FRAME_BYTES = 512 << 20
MAX_JSON_BYTES = 1 << 30

# DRF's NotAuthenticated text: the server saw no credentials it knows (a header with a scheme it lacks, such as
# ``Bearer`` before CVAT had Personal Access Tokens, is ignored, not rejected)
NO_CREDENTIALS = "credentials were not provided"


@dataclass
class RetryPolicy:
    attempts: int = 6          # tries per call, the first included
    backoff: float = 0.5       # seconds before the 2nd try; doubles each time (full jitter)
    max_wait: float = 30.0     # cap on one wait, Retry-After included
    connect_timeout: float = 10.0
    read_timeout: float = 120.0

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        return random.uniform(0, min(self.max_wait, self.backoff * 2 ** attempt))


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_detail(resp: requests.Response, limit: int = 300) -> str:
    """The server's message from any of CVAT's error body shapes."""
    text = ""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = str(body.get("detail") or body.get("message") or body)
    elif isinstance(body, list):
        text = "; ".join(str(x) for x in body)
    elif isinstance(body, str):
        text = body
    else:
        raw = resp.text or ""
        title = re.search(r"<title>(.*?)</title>", raw, re.I | re.S)
        text = title.group(1) if title else re.sub(r"<[^>]+>", " ", raw)
        text = " ".join(text.split())
    return text[:limit] or resp.reason or ""


class CvatClient:
    """``CvatClient(settings)``; use :meth:`get_json`, :meth:`get_bytes`, :meth:`paginate`, :meth:`request`."""

    def __init__(self, settings: Settings, retry: RetryPolicy | None = None, pool_size: int = 8) -> None:
        self.settings = settings
        self.base = settings.url
        self.retry = retry or RetryPolicy()
        self.requests_made = 0
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Accept": CVAT_JSON, "User-Agent": USER_AGENT})
        if settings.org:
            self.session.headers["X-Organization"] = settings.org
        self.session.verify = settings.ca_bundle or not settings.insecure
        if settings.insecure:
            log.warning("TLS certificate checks are OFF (--insecure): use --ca-bundle for a private CA instead")
        self._auth_header: str | None = None
        self._server_version: str | None = None

    # --- auth ---------------------------------------------------------------------------------

    def _authorization(self) -> str | None:
        if self._auth_header is not None:
            return self._auth_header
        s = self.settings
        if s.access_token:
            self._auth_header = f"Bearer {s.access_token.reveal()}"
        elif s.token:
            self._auth_header = f"Token {s.token.reveal()}"
        elif s.username and s.password:
            self._auth_header = self._login(s.username, s.password.reveal())
        else:
            raise AuthError("no CVAT credentials: set CVAT_ACCESS_TOKEN (a Personal Access Token), CVAT_TOKEN, or "
                            "CVAT_USERNAME and CVAT_PASSWORD (environment or the 0600 config file)")
        return self._auth_header

    def _login(self, username: str, password: str) -> str:
        """A legacy API key from ``/api/auth/login``; HTTP Basic where the server has no such route."""
        resp = self._send("POST", "/api/auth/login", json={"username": username, "password": password},
                          auth_header=None)
        if resp.status_code == 200:
            key = (resp.json() or {}).get("key") if _is_json(resp) else None
            if key:
                log.info("logged in to %s as %s", self.base, username)
                return f"Token {key}"
        if resp.status_code in (400, 401, 403):
            raise AuthError(f"CVAT at {self.base} refused the login of user {username!r} "
                            f"({resp.status_code}: {error_detail(resp)}); check CVAT_USERNAME/CVAT_PASSWORD")
        basic = base64.b64encode(f"{username}:{password}".encode()).decode()
        return f"Basic {basic}"

    # --- transport ----------------------------------------------------------------------------

    def url_for(self, path: str) -> str:
        """Absolute URL of ``path``; an absolute ``next``/``result_url`` must point at our own server."""
        if path.startswith(("http://", "https://")):
            own, other = urlsplit(self.base), urlsplit(path)
            if (own.hostname, own.port) != (other.hostname, other.port):
                # behind a proxy CVAT may build links with its internal host: keep the path, use our server
                log.debug("link to %s rewritten to %s", other.netloc, own.netloc)
            return urljoin(self.base + "/", other.path.lstrip("/")) + (f"?{other.query}" if other.query else "")
        return self.base + path

    def _send(self, method: str, path: str, params: dict[str, Any] | None = None, json: Any = None,
              auth_header: str | None = "auto", headers: dict[str, str] | None = None,
              max_body: int | None = None, *, data: Any = None, files: Any = None,
              idempotent: bool = True) -> requests.Response:
        """One call with retries on connection errors, cut-off bodies, 429 and 5xx (body read fully; a body over
        ``max_body`` bytes is :class:`TooLarge`, read no further).

        ``idempotent=False`` is for calls that create something (``POST /api/tasks``, ``POST .../data``). Sending
        such a call twice can create two tasks or start two creation jobs, so it is repeated only when the
        failure proves that the server did not act on it: the connection could not be opened (refused, connect
        timeout), a 429 (DRF throttles before the view runs) or a 503 that carries ``Retry-After`` (the
        server, or the proxy in front of it, turned the request away). Anything else after the request went out
        (a dropped connection, a read timeout, a cut-off answer, a 500/502/504, a 503 without ``Retry-After``)
        raises :class:`OutcomeUnknown` at once. The default (True) keeps the old behaviour for reads and for
        writes that are safe to repeat (PUT/DELETE, login, and the export POST, which CVAT answers with the
        same ``rq_id`` or a 409 while the export runs)."""
        url = self.url_for(path)
        hdrs = dict(headers or {})
        auth = self._authorization() if auth_header == "auto" else auth_header
        if auth:
            hdrs["Authorization"] = auth
        last = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                log.debug("retry %d of %s %s", attempt, method, path)
            try:
                self.requests_made += 1
                resp = self.session.request(method, url, params=params, json=json, data=data, files=files,
                                            headers=hdrs,
                                            timeout=(self.retry.connect_timeout, self.retry.read_timeout),
                                            stream=max_body is not None)
                if max_body is not None:
                    _read_body(resp, max_body)
            except requests.exceptions.SSLError as exc:
                raise CvatError(f"TLS error talking to {self.base}: {_short(exc)}. For a private CA use "
                                "--ca-bundle FILE (or CVAT_CA_BUNDLE); --insecure turns checks off") from None
            except requests.exceptions.InvalidURL as exc:
                raise CvatError(f"invalid URL for {self.base}: {_short(exc)}") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                last = f"{type(exc).__name__}: {_short(exc)}"
                if not idempotent and not _never_sent(exc):
                    raise OutcomeUnknown(f"{method} {self.base}{urlsplit(url).path} broke off after the request was "
                                         f"sent ({type(exc).__name__}); CVAT may have acted on it, so it was not "
                                         "sent again") from None
                time.sleep(self.retry.wait(attempt))
                continue
            if resp.status_code in RETRY_STATUSES:
                if not idempotent and not (resp.status_code == 429 or (resp.status_code == 503
                                                                       and _retry_after(resp) is not None)):
                    raise OutcomeUnknown(f"{method} {self.base}{urlsplit(url).path} got HTTP {resp.status_code} "
                                         f"({error_detail(resp, 120)}); CVAT may have acted on it, so it was not "
                                         "sent again", status=resp.status_code)
                last = f"HTTP {resp.status_code} {error_detail(resp, 120)}"
                wait = self.retry.wait(attempt, _retry_after(resp))
                log.info("%s %s: %s; retrying in %.1f s", method, path, last, wait)
                time.sleep(wait)
                continue
            resp.cvat_attempts = attempt + 1  # type: ignore[attr-defined]  # tries this answer took
            return resp
        raise ServerUnavailable(f"{method} {self.base}{urlsplit(url).path} failed {self.retry.attempts} times "
                                f"(last: {last}); is the server up? Try again later", status=None)

    def request(self, method: str, path: str, params: dict[str, Any] | None = None, json: Any = None,
                ok: tuple[int, ...] = (200,), what: str | None = None, headers: dict[str, str] | None = None,
                max_body: int | None = None) -> requests.Response:
        """:meth:`_send`, then a clear error for any status not in ``ok``."""
        try:
            resp = self._send(method, path, params=params, json=json, headers=headers, max_body=max_body)
        except TooLarge as exc:
            raise TooLarge(f"{what or path} from {self.base}: {exc}", exc.limit) from None
        if resp.status_code not in ok:
            self._raise_for(resp, what or path)
        return resp

    def _raise_for(self, resp: requests.Response, what: str, action: str = "read") -> None:
        detail = error_detail(resp)
        status = resp.status_code
        if status == 401 and self.settings.access_token and NO_CREDENTIALS in detail.lower():
            version = f"CVAT {self._server_version}" if self._server_version else "this CVAT server"
            raise AuthError(f"{version} at {self.base} has no Personal Access Tokens: it ignored CVAT_ACCESS_TOKEN "
                            "(Authorization: Bearer) and saw no credentials (PATs exist only on newer CVAT "
                            "releases; 2.23 has none). Unset CVAT_ACCESS_TOKEN (it takes precedence) and use "
                            "CVAT_TOKEN (an API key) or CVAT_USERNAME and CVAT_PASSWORD", status)
        if status == 401:
            raise AuthError(f"CVAT at {self.base} rejected the credentials ({self.settings.auth_kind}): {detail}. "
                            "Check CVAT_ACCESS_TOKEN / CVAT_TOKEN / CVAT_USERNAME+CVAT_PASSWORD", status)
        if status == 403:
            raise AccessDenied(f"no permission to {action} {what} on {self.base} as {self.settings.auth_kind}: {detail}"
                               + (f" (organization {self.settings.org})" if self.settings.org else "")
                               + ". Ask the owner to add you, or pass --org if it belongs to an organization",
                               status)
        if status == 404:
            raise NotFound(f"{what} not found on {self.base} ({detail}); check the id, and --org if it belongs "
                           "to an organization", status)
        if status == 406:
            raise NotCvatError(f"{self.base} refused CVAT's media type for {what} (406: {detail})", status)
        raise CvatError(f"{what}: HTTP {status} from {self.base}: {detail}", status)

    # --- helpers ------------------------------------------------------------------------------

    def get_json(self, path: str, params: dict[str, Any] | None = None, what: str | None = None) -> Any:
        resp = self.request("GET", path, params=params, what=what, max_body=MAX_JSON_BYTES)
        if not _is_json(resp):
            raise NotCvatError(f"{self.base}{path} answered {resp.headers.get('Content-Type', 'no content type')}, "
                               "not JSON: is this the CVAT server's URL (not its UI or a proxy login page)?")
        return resp.json()

    def get_bytes(self, path: str, params: dict[str, Any] | None = None, what: str | None = None) -> bytes:
        """A binary body (frames). Asks for no gzip: JPEG/PNG do not compress, and CVAT (Django's
        GZipMiddleware) would spend CPU gzipping every frame for nothing."""
        return self.request("GET", path, params=params, what=what, headers={"Accept-Encoding": "identity"},
                            max_body=MAX_FRAME_BYTES).content

    def paginate(self, path: str, params: dict[str, Any] | None = None, what: str | None = None,
                 page_size: int = 100) -> Iterator[dict]:
        """Every item of a paginated list, following ``next`` links."""
        query = {"page_size": page_size, **(params or {})}
        page: Any = self.get_json(path, query, what)
        while True:
            if not isinstance(page, dict) or "results" not in page:
                raise NotCvatError(f"{self.base}{path} did not return a CVAT list (no 'results')")
            yield from page["results"]
            nxt = page.get("next")
            if not nxt:
                return
            page = self.get_json(nxt, None, what)

    def download(self, path: str, dest: Path, params: dict[str, Any] | None = None, what: str | None = None,
                 max_bytes: int | None = None) -> int:
        """Stream ``path`` into ``dest`` (written as ``dest.part`` then renamed); one attempt, no retries,
        because CVAT's export ``result_url`` works only once. Returns the size in bytes. More than ``max_bytes``
        (counted as received, whatever ``Content-Length`` says): :class:`TooLarge`, nothing kept."""
        part = dest.with_name(dest.name + ".part")
        headers = {"Authorization": self._authorization() or ""}
        self.requests_made += 1
        try:
            with self.session.get(self.url_for(path), params=params, headers=headers, stream=True,
                                  timeout=(self.retry.connect_timeout, self.retry.read_timeout)) as resp:
                if resp.status_code != 200:
                    self._raise_for(resp, what or path)
                size = 0
                with open(part, "wb") as fh:
                    for chunk in resp.iter_content(1 << 20):
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise TooLarge(f"{what or path} is larger than {max_bytes} bytes", max_bytes)
                        fh.write(chunk)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            part.unlink(missing_ok=True)
            raise ServerUnavailable(f"download of {what or path} broke off: {type(exc).__name__}") from None
        except (OSError, CvatError):
            part.unlink(missing_ok=True)
            raise
        part.replace(dest)
        return size

    def server_version(self) -> str:
        """``/api/server/about``'s version; :class:`NotCvatError` when the URL is not a CVAT server."""
        if self._server_version is None:
            resp = self._send("GET", "/api/server/about", auth_header=None)
            about = resp.json() if resp.status_code == 200 and _is_json(resp) else None
            if not isinstance(about, dict) or "version" not in about:
                raise NotCvatError(f"{self.base} does not look like a CVAT server: GET /api/server/about gave "
                                   f"HTTP {resp.status_code} {resp.headers.get('Content-Type', '')}. Check CVAT_URL")
            self._server_version = str(about["version"])
        return self._server_version

    # --- task creation ------------------------------------------------------------------------

    def create_task(self, name: str, labels: list[dict] | None = None, *, project_id: int | None = None,
                    segment_size: int | None = None) -> dict:
        """``POST /api/tasks``: a new task without data (give it images with :meth:`upload_task_images`); returns
        the task as CVAT answers it (``id``, ``url``, ``labels`` link, ...).

        ``labels`` as CVAT takes them (``[{"name", "type", "color"?, "attributes": [{"name", "mutable",
        "input_type", "default_value", "values"}]}]``). A task in a project (``project_id``) uses the project's
        labels and must be given none. ``segment_size``: frames per job (CVAT's default, 0, is one job).
        Raises :class:`TaskCreateError` with the server's reasons when CVAT refuses (400), :class:`AccessDenied`
        (403), and :class:`OutcomeUnknown` when the call broke off after it may have created the task: it is
        never sent twice (see :meth:`_send`)."""
        body: dict[str, Any] = {"name": name}
        if labels is not None:
            body["labels"] = labels
        if project_id is not None:
            body["project_id"] = project_id
        if segment_size is not None:
            body["segment_size"] = segment_size
        resp = self._send("POST", "/api/tasks", json=body, idempotent=False)
        if resp.status_code == 400:
            raise TaskCreateError(f"CVAT at {self.base} refused to create task {name!r}: {_validation_text(resp)}",
                                  400)
        if resp.status_code != 201:
            self._raise_for(resp, f"task {name!r}", action="create")
        task = resp.json() if _is_json(resp) else None
        if not isinstance(task, dict) or not isinstance(task.get("id"), int):
            raise NotCvatError(f"{self.base}/api/tasks answered the task creation with HTTP {resp.status_code} but no "
                               "task object: is this a CVAT server?")
        log.info("created task %d on %s", task["id"], self.base)
        return task

    def upload_task_images(self, task_id: int, files: Sequence[tuple[str, bytes]], *, image_quality: int = 70,
                           sorting_method: str = "predefined", poll_seconds: float = 0.5,
                           timeout_s: float = 600.0) -> None:
        """Give a task created by :meth:`create_task` its images and wait until CVAT has made its frames and jobs.

        ``files``: ``(name, bytes)`` pairs; the names become the frame names (CVAT keeps only the part after the
        last ``/``, so names with a path and repeated names are refused here with :class:`ValueError`).
        ``sorting_method="predefined"`` keeps this order; ``lexicographical``/``natural`` sort by name,
        ``random`` shuffles. One multipart ``POST /api/tasks/{id}/data`` (``client_files[i]``, ``image_quality``,
        ``sorting_method``; not repeated once sent, see :meth:`_send`), then ``GET /api/requests/{rq_id}``
        every ``poll_seconds`` until ``finished``. :class:`TaskCreateError` when CVAT refuses the upload (400),
        when the request ends ``failed`` (with the server's message, e.g. a file that is not an image) or is not
        finished after ``timeout_s``. A task whose upload failed is left without data: delete it with
        :meth:`delete_task`."""
        if not files:
            raise ValueError("no images to upload")
        if sorting_method not in SORTING_METHODS:
            raise ValueError(f"sorting_method must be one of {SORTING_METHODS}, got {sorting_method!r}")
        if isinstance(image_quality, bool) or not 0 <= int(image_quality) <= 100:
            raise ValueError(f"image_quality must be 0..100, got {image_quality!r}")
        names = [name for name, _ in files]
        for name in names:
            if not isinstance(name, str) or not name.strip() or name in (".", "..") or re.search(r"[/\\]", name):
                raise ValueError(f"an image name must be a plain file name (CVAT keeps only the part after the "
                                 f"last '/'), got {name!r}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"image names must be unique in a task (CVAT would keep only one of each): {repeated}")
        parts = [(f"client_files[{i}]", (name, bytes(data), mimetypes.guess_type(name)[0] or OCTET_STREAM))
                 for i, (name, data) in enumerate(files)]
        fields = {"image_quality": str(int(image_quality)), "sorting_method": sorting_method}
        what = f"the {len(files)} images of task {task_id}"
        resp = self._send("POST", f"/api/tasks/{task_id}/data", data=fields, files=parts, idempotent=False)
        if resp.status_code == 400:
            raise TaskCreateError(f"CVAT at {self.base} refused {what}: {_validation_text(resp)}", 400)
        if resp.status_code != 202:
            self._raise_for(resp, f"task {task_id}", action="upload images to")
        answer = resp.json() if _is_json(resp) else None
        rq_id = answer.get("rq_id") if isinstance(answer, dict) else None
        if not isinstance(rq_id, str) or not rq_id:
            raise NotCvatError(f"{self.base} accepted {what} without a request id (HTTP {resp.status_code}): is "
                               "this a CVAT server?")
        log.info("uploaded %s (%.1f MB); waiting for request %s", what, sum(len(d) for _, d in files) / 1e6, rq_id)
        self._wait_for_creation(task_id, rq_id, poll_seconds, timeout_s)

    def _wait_for_creation(self, task_id: int, rq_id: str, poll_seconds: float, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        path = f"/api/requests/{quote(rq_id, safe=':@=&')}"  # ':' and '@' stay raw, as CVAT's clients send them
        while True:
            status = self.get_json(path, what=f"the creation request {rq_id} of task {task_id}")
            state = status.get("status") if isinstance(status, dict) else None
            if state == "finished":
                return
            if state == "failed":
                message = " ".join(str(status.get("message") or "no message").split())[:500]
                raise TaskCreateError(f"CVAT could not create the data of task {task_id}: {message}")
            if state not in ("queued", "started"):
                raise NotCvatError(f"{self.base}{path} gave no request status (got {state!r}): is this a CVAT "
                                   "server?")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TaskCreateError(f"the data of task {task_id} was not ready after {timeout_s:g} s (request "
                                      f"{rq_id} still {state}); CVAT's import worker may be busy or down")
            time.sleep(max(0.0, min(poll_seconds, remaining)))

    def delete_task(self, task_id: int) -> None:
        """``DELETE /api/tasks/{id}`` (its jobs, frames and annotations go with it). Repeated like any call on
        connection errors and 5xx; a 404 after such a repeat means an earlier try did delete it."""
        resp = self._send("DELETE", f"/api/tasks/{task_id}")
        if resp.status_code in (200, 202, 204):
            log.info("deleted task %d on %s", task_id, self.base)
            return
        if resp.status_code == 404 and getattr(resp, "cvat_attempts", 1) > 1:
            return
        self._raise_for(resp, f"task {task_id}", action="delete")

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> CvatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_body(resp: requests.Response, limit: int) -> None:
    """Read a streamed body into ``resp`` (so ``.content``/``.json()`` work), refusing more than ``limit`` bytes.
    Connection errors and cut-off bodies propagate as ``requests`` raises them (the caller retries those)."""
    body = bytearray()
    try:
        for chunk in resp.iter_content(1 << 20):
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"the server sent more than {limit >> 20} MiB, more than any CVAT answer of this "
                               "kind; refused (nothing was kept)", limit)
    except BaseException:
        resp.close()
        raise
    resp._content = bytes(body)
    resp._content_consumed = True


def _is_json(resp: requests.Response) -> bool:
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return ctype in (CVAT_JSON, "application/json") or ctype.endswith("+json")


def _short(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


def version_tuple(version: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", version)
    return tuple(int(n) for n in nums[:3])


def _never_sent(exc: BaseException) -> bool:
    """True when a ``requests`` error proves the request never reached the server: the connection could not be
    opened (refused, DNS, connect timeout). A reset, a read timeout or a cut-off body come after it was sent."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args:
        return False
    cause = exc.args[0]
    reason = cause.reason if isinstance(cause, urllib3.exceptions.MaxRetryError) else cause
    return isinstance(reason, urllib3.exceptions.ConnectTimeoutError)  # NewConnectionError is one too


def _validation_text(resp: requests.Response, limit: int = 500) -> str:
    """A 400's reasons in one line: DRF's field errors (``{"labels": [{"name": ["This field is required."]}]}``)
    become ``labels[0].name: This field is required.``; other shapes as :func:`error_detail` reads them."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "detail" in body:
        return error_detail(resp, limit)
    items = [f"{where}: {text}" if where else text for where, text in _flatten_errors(body)]
    return " ".join("; ".join(items).split())[:limit] or error_detail(resp, limit)


def _flatten_errors(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            inner = where if key == "non_field_errors" else f"{where}.{key}" if where else str(key)
            yield from _flatten_errors(value, inner)
    elif isinstance(node, list) and all(isinstance(x, str) for x in node):
        for text in node:
            yield where, text
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _flatten_errors(value, f"{where}[{index}]")
    else:
        yield where, str(node)
