"""The aggregator's HTTP endpoint: the status page, its JSON, Prometheus metrics.

    GET /              the status page (one HTML file, no build step, no CDN)
    GET /status.json   `observe.status.status_document`
    GET /metrics       Prometheus text format (`observe.prometheus`)
    GET /healthz       "ok"

Bound to 127.0.0.1 unless told otherwise (an operator opens it with an SSH tunnel or a
reverse proxy); a daemon thread; `stop()` closes it.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from edge_runtime.errors import UserError
from edge_runtime.observe.status import PlanCache, status_document
from edge_runtime.rounds.server import AggregatorService

__all__ = ["ObserveServer"]

log = logging.getLogger(__name__)


class ObserveServer:
    """Serve `svc`'s status page, status JSON and metrics on host:port (0: a free port)."""

    def __init__(self, svc: AggregatorService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.svc = svc
        plans = PlanCache()
        page = resources.files("edge_runtime.observe").joinpath("status.html").read_bytes()
        registry: Any = None
        try:
            from edge_runtime.observe.prometheus import make_registry

            registry = make_registry(svc)
        except UserError as e:
            log.warning("%s; /metrics is off", e)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", page)
                elif path == "/status.json":
                    body = json.dumps(status_document(outer.svc, plans)).encode()
                    self._send(200, "application/json", body)
                elif path == "/metrics" and registry is not None:
                    from edge_runtime.observe.prometheus import metrics_text

                    self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                               metrics_text(registry))
                elif path == "/metrics":
                    self._send(501, "text/plain", b"pip install 'edge-runtime[observe]'\n")
                elif path == "/healthz":
                    self._send(200, "text/plain", b"ok\n")
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s", format % args)

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise UserError(f"cannot serve the status page on {host}:{port} ({e}); pass "
                            "another --http-port") from None
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="observe-http",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
