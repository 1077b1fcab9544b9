"""The rating page and its JSON API, served by the standard library's threading HTTP server.

Routes (every one needs the token unless the server was started without one):

    GET  /                     the page (index.html; app.js and style.css under /static/)
    GET  /?token=T             sets the token cookie and redirects to /
    GET  /api/next?rater=NAME  {"item": Item or null, "counts": QueueCounts}
    GET  /api/counts[?rater=]  QueueCounts
    GET  /api/items/ID         Item
    POST /api/ratings          {"item_id", "rater", and one of "choice" | "scores" | "skip": true,
                               optionally "order"} -> 201 {"rating": Rating, "counts": QueueCounts}

Errors are JSON ``{"error": message, "field": name or null}`` with a 4xx status:
400 malformed, 401 no or wrong token, 403 foreign Host or Origin, 404 unknown
item or route, 405 another method, 409 duplicate rating, 411/413/415 missing,
too large or non-JSON body.

Security. The server binds to 127.0.0.1 by default. A random token (printed on
start, or taken from ``OUROBOROS_RATE_TOKEN``) is required on every request, in
an ``Authorization: Bearer`` header (the Python client) or in an HttpOnly,
SameSite=Strict cookie the page gets by opening ``/?token=T`` once. It is
required on localhost too, because other users and processes on the machine,
and web pages in a local browser (cross-site requests, DNS rebinding), can
reach a loopback port; `require_token=False` is allowed on a loopback address
only. On a loopback bind the Host header must name the loopback address (DNS
rebinding); a POST must be ``application/json`` and any Origin must be the
server's own (cross-site forms). Model outputs reach the page only as JSON and
are put in the DOM as text; the Content-Security-Policy allows only the
server's own script and style, no inline code, and Trusted Types forbid HTML
string sinks, so a completion holding ``<script>`` shows as text.
"""

from __future__ import annotations

import hmac
import http.cookies
import ipaddress
import json
import secrets
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from ouroboros_jax.rate.items import RatingError
from ouroboros_jax.rate.store import RatingStore

DEFAULT_PORT = 8765
TOKEN_ENV = "OUROBOROS_RATE_TOKEN"
MAX_BODY_BYTES = 64 * 1024
RATING_FIELDS = frozenset({"item_id", "rater", "choice", "scores", "skip", "order"})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = {  # path -> (file under static/, content type); nothing else is served from disk
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or ``localhost``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HTTPError(Exception):
    """An error answered as JSON with this status."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: RatingServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ouroboros-rate"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self._dispatch(self.server.app.handle_get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self.server.app.handle_post)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self.server.app.handle_get)

    def _not_allowed(self) -> None:
        # Answered here, with the security headers and a JSON error, not by http.server's HTML page.
        def refuse(request: _Handler) -> tuple[int, dict[str, str], bytes]:
            raise HTTPError(405, f"method {request.command} not allowed (GET, HEAD, POST)", "method")

        self._dispatch(refuse)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _dispatch(self, handle) -> None:
        try:
            status, headers, body = handle(self)
        except HTTPError as e:
            status, headers, body = e.status, {}, _json_bytes({"error": e.message, "field": e.field})
        except RatingError as e:
            status, headers, body = e.status, {}, _json_bytes(e.to_json())
        except Exception:  # an answer, not a dropped connection, and the traceback on the server's log
            traceback.print_exc(file=self.server.app.log)
            status, headers, body = 500, {}, _json_bytes({"error": "internal server error", "field": None})
        self.send_response(status)
        headers = {"Content-Type": "application/json; charset=utf-8", **headers}
        if status == 405:
            headers["Allow"] = "GET, HEAD, POST"
        for name, value in {**SECURITY_HEADERS, **headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The query string may hold the token: log the path only.
        if not self.server.app.quiet:
            path = urlsplit(self.path).path
            print(f"rate: {self.client_address[0]} {self.command} {path} {code}", file=self.server.app.log,
                  flush=True)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.app.quiet:
            print(f"rate: {self.client_address[0]} {format % args}", file=self.server.app.log, flush=True)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class RatingServer:
    """Serves the rating page and the JSON API for `store` on `host:port` (0 picks a free port).

    Args:
      store: the queue and ratings.
      host: the address to bind; anything but a loopback address needs the token.
      port: the TCP port.
      token: the secret every request must carry (16 characters or more); None draws a
        random one (the command line passes ``OUROBOROS_RATE_TOKEN`` here when set).
      require_token: False serves without a token; allowed on a loopback host only.
      quiet: no request log.
      log: where the request log and server errors go.
    """

    def __init__(self, store: RatingStore, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 token: str | None = None, require_token: bool = True, quiet: bool = False,
                 log: TextIO | None = None):
        if not require_token and not is_loopback(host):
            raise ValueError(f"host: serving {host!r} without a token would let anyone on the network rate; "
                             "bind to 127.0.0.1 or keep the token")
        if token is not None and len(token) < 16:
            raise ValueError("token: use at least 16 characters")
        self.store = store
        self.token = (token or secrets.token_urlsafe(24)) if require_token else None
        self.quiet = quiet
        self.log = log if log is not None else sys.stderr
        self.loopback = is_loopback(host)
        server_class = _Server
        if ":" in host.strip("[]"):
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self._httpd = server_class((host.strip("[]"), port), _Handler)
        self._httpd.app = self
        self.host = host
        self.port = self._httpd.server_address[1]
        self.cookie_name = f"ouroboros_rate_{self.port}"  # cookies ignore ports: one name per server
        self._static = {path: (resources.files(__package__).joinpath("static", name).read_bytes(), kind)
                        for path, (name, kind) in STATIC.items()}
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, ``http://host:port``."""
        host = self.host if ":" not in self.host.strip("[]") else f"[{self.host.strip('[]')}]"
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}"

    @property
    def page_url(self) -> str:
        """The URL to open in a browser (it carries the token, when there is one)."""
        return f"{self.url}/" + (f"?token={self.token}" if self.token else "")

    def serve_forever(self) -> None:
        """Serve in this thread until `close` (from another thread) or KeyboardInterrupt."""
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> RatingServer:
        """Serve from a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="rating-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RatingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request handling (called from the handler's threads) -----------------

    def _check_host(self, request: _Handler) -> None:
        # A loopback server answers only requests addressed to a loopback name: a page whose
        # domain was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name. Any port is
        # fine, so an ssh tunnel to another local port still works.
        if not self.loopback:
            return
        host = request.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in ("127.0.0.1", "localhost", "[::1]"):
            raise HTTPError(403, f"Host {host!r:.80} is not a loopback address of this server", "Host")

    def _check_token(self, request: _Handler) -> None:
        if self.token is None:
            return
        auth = request.headers.get("Authorization", "")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if given is None:
            cookies = http.cookies.SimpleCookie()
            try:
                cookies.load(request.headers.get("Cookie", ""))
            except http.cookies.CookieError:
                pass
            given = cookies[self.cookie_name].value if self.cookie_name in cookies else None
        if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPError(401, "missing or wrong token: open the URL the server printed when it started "
                                 "(it ends in ?token=...), or send 'Authorization: Bearer TOKEN'", "token")

    def handle_get(self, request: _Handler) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == "/favicon.ico":
            return 204, {}, b""
        self._check_host(request)
        if url.path == "/" and "token" in query and self.token is not None:
            if not hmac.compare_digest(query["token"][0].encode(), self.token.encode()):
                raise HTTPError(401, "wrong token in the URL", "token")
            # The cookie carries the token from now on; the redirect drops it from the address bar.
            cookie = f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            return 303, {"Set-Cookie": cookie, "Location": "/"}, b""
        self._check_token(request)
        if url.path in self._static:
            body, kind = self._static[url.path]
            return 200, {"Content-Type": kind}, body
        rater = query["rater"][0] if "rater" in query else None
        if url.path == "/api/next":
            if rater is None:
                raise HTTPError(400, "rater: missing (GET /api/next?rater=NAME)", "rater")
            item = self.store.next_item(rater)
            return 200, {}, _json_bytes({"item": None if item is None else item.to_json(),
                                         "counts": self.store.counts(rater).to_json()})
        if url.path == "/api/counts":
            return 200, {}, _json_bytes(self.store.counts(rater).to_json())
        if url.path.startswith("/api/items/"):
            number = url.path[len("/api/items/"):]
            if not number.isdigit():
                raise HTTPError(404, f"no item {number!r:.40}", "item_id")
            return 200, {}, _json_bytes(self.store.get_item(int(number)).to_json())
        raise HTTPError(404, f"no route GET {url.path:.80}")

    def handle_post(self, request: _Handler) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(request.path)
        self._check_host(request)
        self._check_token(request)
        if url.path != "/api/ratings":
            raise HTTPError(404, f"no route POST {url.path:.80}")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.headers.get('Host', '')}":
            raise HTTPError(403, f"Origin {origin!r:.80} is not this server", "Origin")
        body = self._json_body(request)
        unknown = sorted(set(body) - RATING_FIELDS)
        if unknown:
            raise HTTPError(400, f"unknown fields {unknown} (expected {sorted(RATING_FIELDS)})", unknown[0])
        for name in ("item_id", "rater"):
            if name not in body:
                raise HTTPError(400, f"{name}: missing", name)
        rating = self.store.add_rating(body["item_id"], body["rater"], choice=body.get("choice"),
                                       scores=body.get("scores"), skip=body.get("skip", False),
                                       order=body.get("order"))
        # add_rating has committed: only now does the client hear that the rating is stored.
        counts = self.store.counts(rating.rater)
        return 201, {}, _json_bytes({"rating": rating.to_json(), "counts": counts.to_json()})

    @staticmethod
    def _json_body(request: _Handler) -> dict[str, Any]:
        kind = request.headers.get("Content-Type", "")
        if kind.split(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, f"Content-Type must be application/json (got {kind!r:.60})", "Content-Type")
        length = request.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "Content-Length: missing or not a number", "Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise HTTPError(413, f"body: at most {MAX_BODY_BYTES} bytes (got {length})", "body")
        raw = request.rfile.read(int(length))
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise HTTPError(400, f"body: not valid JSON ({e})", "body") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"body: expected a JSON object, got {type(body).__name__}", "body")
        return body
