"""The stand-in's HTTP side: a threaded HTTP/1.1 (keep-alive) server on 127.0.0.1, gzip like Django's
GZipMiddleware, chunked file downloads, fault injection and the request log. See the package docstring.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.cvat_standin.api import JSON_CT, Api, Ctx, HttpError, Resp, json_resp, text_resp
from tests.cvat_standin.faults import Fault, FaultSet
from tests.cvat_standin.state import CvatState

log = logging.getLogger(__name__)

HTTP_FAULTS = ("status", "throttle", "delay", "reset", "drop", "truncate")
GZIP_MIN = 200  # Django's GZipMiddleware leaves shorter bodies alone
CHUNK = 64 * 1024

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class LogEntry:
    """One request as the stand-in saw it: ``bytes`` = body bytes written to the socket (after gzip; only the
    part sent for a ``drop``/``truncate``), ``fault`` = the fault that fired (``"delay"`` when only a delay did),
    ``status`` 0 for a ``reset``, ``kind`` = the route kind (see :data:`~tests.cvat_standin.faults.ROUTE_KINDS`),
    ``seconds`` = time until the response was ready to send. An entry is logged before its response is sent, so
    it is in ``log`` by the time the client has the response."""

    method: str
    path: str
    query: str
    status: int
    kind: str
    bytes: int
    fault: str | None
    user: str | None
    seconds: float
    gzip: bool


def fault_response(fault: Fault) -> Resp:
    """The answer of a ``status`` fault: Django's plain 500 page, or a proxy's HTML page for 502/503/504."""
    code = fault.status
    if code == 500:
        page = ('<!doctype html>\n<html lang="en">\n<head>\n  <title>Server Error (500)</title>\n</head>\n<body>\n'
                "  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n")
        return text_resp(500, page)
    reason = _REASONS.get(code, "Error")
    page = (f"<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}"
            "</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
    resp = Resp(code, page.encode(), "text/html", [("x-standin-server", "nginx")])
    return resp


def tamper_response(fault: Fault, resp: Resp) -> Resp:
    """A ``tamper`` fault's rewrite of a response (see :mod:`tests.cvat_standin.faults`): a JSON body goes through
    ``transform`` decoded and is sent re-encoded as the stand-in writes JSON; any other body as bytes."""
    assert fault.transform is not None
    if resp.content_type == JSON_CT and resp.body:
        data = fault.transform(json.loads(resp.body))
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    else:
        body = bytes(fault.transform(resp.body))
    return dataclasses.replace(resp, body=body)


def throttle_response(fault: Fault) -> Resp:
    wait = int(fault.retry_after)
    unit = "second" if wait == 1 else "seconds"
    return json_resp(429, {"detail": f"Request was throttled. Expected available in {wait} {unit}."},
                     [("retry-after", str(wait))])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("stand-in %s: " + format, self.address_string(), *args)

    def _any(self) -> None:
        self.server.cvat._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cvat: StandinCVAT) -> None:
        self.cvat = cvat
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (e.g. one refusing an oversized body) is routine for a server: logged at debug
        level, not printed as a traceback (other errors still are)."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            log.debug("stand-in: %s closed the connection", client_address)
            return
        super().handle_error(request, client_address)


class StandinCVAT(CvatState):
    """A CVAT 2.23.1 stand-in server (see the package docstring for the API)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, version: str = "2.23.1", seed: int = 0,
                 export_polls: int = 1, admin: tuple[str, str] | None = ("admin", "admin"),
                 admin_id: int = 1) -> None:
        super().__init__(version=version, seed=seed, export_polls=export_polls)
        self.host = host
        self.port = port
        self.faults = FaultSet(seed)
        self.api = Api(self)
        self._log: list[LogEntry] = []
        self._log_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.admin_token: str | None = None
        if admin is not None:
            self.admin_token = self.add_user(admin[0], admin[1], admin=True, id=admin_id,
                                             email=f"{admin[0]}@localhost.localdomain")

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> StandinCVAT:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"cvat-standin-{self.port}", daemon=True)
        self._thread.start()
        log.info("CVAT %s stand-in listening on %s", self.version, self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> StandinCVAT:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (start the server first)."""
        return f"http://{self.host}:{self.port}"

    # --- faults and log -----------------------------------------------------------------------------

    def add_fault(self, kind: str, route: str | tuple[str, ...] = "any", *, rate: float = 1.0,
                  times: int | None = None, method: str | None = None, path_contains: str | None = None,
                  **options: Any) -> Fault:
        """Switch a fault on (see :mod:`tests.cvat_standin.faults`); returns it (``.fired`` counts firings)."""
        return self.faults.add(Fault(kind=kind, route=route, rate=rate, times=times, method=method,
                                     path_contains=path_contains, **options))

    def remove_fault(self, fault: Fault) -> None:
        self.faults.remove(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    @property
    def log(self) -> list[LogEntry]:
        """A copy of the request log, oldest first."""
        with self._log_lock:
            return list(self._log)

    def reset_log(self) -> None:
        with self._log_lock:
            self._log.clear()

    def log_where(self, kind: str | None = None, status: int | None = None,
                  method: str | None = None) -> list[LogEntry]:
        return [e for e in self.log if (kind is None or e.kind == kind) and (status is None or e.status == status)
                and (method is None or e.method == method)]

    def bytes_sent(self, kind: str | None = None) -> int:
        return sum(e.bytes for e in self.log_where(kind))

    # --- serving ------------------------------------------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        started = time.perf_counter()
        split = urlsplit(h.path)
        path, raw_query = split.path, split.query
        query = parse_qsl(raw_query, keep_blank_values=True)
        method = h.command
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length > 0 else b""
        route = self.api.resolve(method, path, query)
        fault: Fault | None = None
        delayed = False
        for fired in self.faults.pick(route.kind, method, path, HTTP_FAULTS):
            if fired.kind == "delay":
                time.sleep(fired.delay)
                delayed = True
            else:
                fault = fired
        host = h.headers.get("Host") or f"{self.host}:{self.port}"
        ctx = Ctx(method=method, path=path, query=query, headers=h.headers, body=body, base=f"http://{host}")
        tampered = False

        def record(status: int, sent: int, gz: bool) -> LogEntry:
            entry = LogEntry(method=method, path=path, query=raw_query, status=status, kind=route.kind, bytes=sent,
                             fault=fault.kind if fault else "tamper" if tampered else "delay" if delayed else None,
                             user=ctx.user.username if ctx.user else None,
                             seconds=time.perf_counter() - started, gzip=gz)
            with self._log_lock:
                self._log.append(entry)
            return entry

        if fault is not None and fault.kind == "reset":
            record(0, 0, False)
            self._abort(h)
            return
        if fault is not None and fault.kind == "status":
            resp = fault_response(fault)
        elif fault is not None and fault.kind == "throttle":
            resp = throttle_response(fault)
        else:
            try:
                resp = self.api.handle(route, ctx)
            except HttpError as exc:
                resp = exc.resp
            except Exception:
                log.exception("stand-in: %s %s failed", method, h.path)
                resp = fault_response(Fault(kind="status", status=500))
            for tamper in self.faults.tampers(route.kind, method, path):
                resp = tamper_response(tamper, resp)
                tampered = True
        resp, gz = self._gzip(h, resp)
        cut = fault if fault is not None and fault.kind in ("drop", "truncate") else None
        head = method == "HEAD"
        # Logged before the response goes out, so a client that reads ``log`` right after its response already
        # finds the entry (and a later ``reset_log()`` never catches a late one); corrected if the send fails.
        planned = 0 if head else len(resp.body) if cut is None else int(len(resp.body) * cut.fraction)
        entry = record(resp.status, planned, gz)
        try:
            sent = self._send(h, resp, cut, head=head)
        except (BrokenPipeError, ConnectionResetError) as exc:
            log.debug("stand-in: client went away during %s %s: %s", method, path, exc)
            h.close_connection = True
            sent = 0
        if sent != planned:
            with self._log_lock:
                for index, logged in enumerate(self._log):
                    if logged is entry:
                        self._log[index] = dataclasses.replace(entry, bytes=sent)
                        break

    @staticmethod
    def _gzip(h: _Handler, resp: Resp) -> tuple[Resp, bool]:
        accept = h.headers.get("Accept-Encoding") or ""
        if not re.search(r"\bgzip\b", accept) or not resp.body or resp.status in (204, 304):
            return resp, False
        if not resp.stream and len(resp.body) < GZIP_MIN:
            return resp, False
        compressed = gzip.compress(resp.body, compresslevel=6, mtime=0)
        if not resp.stream and len(compressed) >= len(resp.body):
            return resp, False  # Django sends the plain body when gzip does not make it shorter
        resp.body = compressed
        resp.headers = [*resp.headers, ("content-encoding", "gzip")]
        return resp, True

    def _send(self, h: _Handler, resp: Resp, cut: Fault | None, head: bool) -> int:
        body = resp.body
        chunked = resp.stream and not (cut is not None and cut.kind == "truncate")
        server = "uvicorn"
        extra = []
        for key, value in resp.headers:
            if key == "x-standin-server":
                server = value
            else:
                extra.append((key, value))
        h.send_response_only(resp.status)
        h.send_header("Date", h.date_time_string())
        h.send_header("Server", server)
        if resp.content_type:
            h.send_header("Content-Type", resp.content_type)
        for key, value in extra:
            h.send_header(key, value)
        encoded = any(k == "content-encoding" for k, _ in extra)
        h.send_header("Vary", "Accept, Accept-Encoding, Origin, Cookie" if encoded else "Accept, Origin, Cookie")
        h.send_header("X-Request-Id", str(uuid.uuid4()))
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            h.wfile.flush()
            return 0
        limit = len(body) if cut is None else int(len(body) * cut.fraction)
        sent = 0
        if chunked:
            for start in range(0, limit, CHUNK):
                piece = body[start:min(start + CHUNK, limit)]
                h.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
            if cut is None:
                h.wfile.write(b"0\r\n\r\n")
        else:
            h.wfile.write(body[:limit])
            sent = limit
        h.wfile.flush()
        if cut is not None:
            self._abort(h)
        return sent

    @staticmethod
    def _abort(h: _Handler) -> None:
        """Close the connection at once (a reset, or the end of a cut-off body)."""
        h.close_connection = True
        try:
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
