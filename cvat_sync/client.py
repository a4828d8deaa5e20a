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
"""

from __future__ import annotations

import base64
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from cvat_sync.config import Settings

log = logging.getLogger(__name__)

CVAT_JSON = "application/vnd.cvat+json"
USER_AGENT = "cvat_sync/0.1 (wbc-annotator)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


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
              max_body: int | None = None) -> requests.Response:
        """One call with retries on connection errors, cut-off bodies, 429 and 5xx (body read fully; a body over
        ``max_body`` bytes is :class:`TooLarge`, read no further)."""
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
                resp = self.session.request(method, url, params=params, json=json, headers=hdrs,
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
                time.sleep(self.retry.wait(attempt))
                continue
            if resp.status_code in RETRY_STATUSES:
                last = f"HTTP {resp.status_code} {error_detail(resp, 120)}"
                wait = self.retry.wait(attempt, _retry_after(resp))
                log.info("%s %s: %s; retrying in %.1f s", method, path, last, wait)
                time.sleep(wait)
                continue
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

    def _raise_for(self, resp: requests.Response, what: str) -> None:
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
            raise AccessDenied(f"no permission to read {what} on {self.base} as {self.settings.auth_kind}: {detail}"
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
