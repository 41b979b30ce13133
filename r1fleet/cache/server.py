"""Serve the controller's artifact cache to the fleet's hosts over the LAN, for one run (issue 13 item 4).

    server = serve_cache(cache, "192.168.1.10", allow=["192.168.1.0/24"])
    with server as base_url:              # http://192.168.1.10:PORT
        ...                               # hosts: curl -fSL -C - -o F.part $base_url/sha256/<hex>
    server.served                         # {"<hex>": bytes sent}

Only `GET`/`HEAD /sha256/<hex>` of an entry the cache holds, verified and opened as the regular file its
stamp names (ArtifactCache.open_entry: never through a link); anything else is 404, with no listing. A client
outside `allow` gets 403 as it connects, before a byte of its request is read and without a thread of its
own. Each client holds at most MAX_PER_CLIENT connections and all of them MAX_CONNECTIONS (more are answered
503 and closed), each request's line and headers must arrive within HEAD_S, and a connection idle or stuck
for TIMEOUT_S is closed. Single byte ranges are answered 206 (RFC 9110 sections 14.2 and 15.3.7), so
`curl -C -` resumes; a multi-range request gets the whole file with 200, which a server MAY do (14.2: it may
ignore Range). Hosts still check each file's sha256 themselves (roles/common.py fetch_verified): the LAN is
not trusted with integrity.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

from r1fleet.cache.store import ArtifactCache
from r1fleet.errors import R1FleetError
from r1fleet.net import host_port

ENTRY_PATH = re.compile(r"/sha256/([0-9a-f]{64})")
SEND_CHUNK = 4 << 20
# A host downloads one artifact at a time over one connection (curl, with a retry or a fallback beside it).
MAX_PER_CLIENT = 8
MAX_CONNECTIONS = 64
HEAD_S = 10.0  # a request line and its headers are a few hundred bytes
TIMEOUT_S = 60.0  # no byte moved for this long, either way: the host is gone

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(allow: Iterable[str]) -> list[Network]:
    networks = []
    for item in allow:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise R1FleetError(f"{item!r} is not an IP address or network", field="allow",
                               fix="write addresses or CIDRs such as 192.168.1.0/24") from None
    return networks


def client_allowed(address: str, networks: Iterable[Network]) -> bool:
    """Whether a peer address is in the allow-list; an IPv4 client on a dual-stack socket arrives as
    ::ffff:a.b.c.d and is judged by its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(first, last) of a single `bytes=` range; None = serve the whole file; "unsatisfiable" = 416."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match or not (match[1] or match[2]):
        return None  # absent, multi-range or another unit: ignoring Range is allowed (RFC 9110 14.2)
    if not match[1]:  # bytes=-N: the last N bytes (RFC 9110 14.1.2)
        suffix = int(match[2])
        return (max(size - suffix, 0), size - 1) if suffix and size else "unsatisfiable"
    first = int(match[1])
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or (match[2] and int(match[2]) < first):
        return "unsatisfiable"
    return first, last


def _refuse(connection: socket.socket, status: str) -> None:
    """An answer without reading the request: a few bytes a fresh connection's buffer takes without waiting."""
    try:
        connection.setblocking(False)
        connection.send(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"  # keep-alive, so curl's retries and ranges reuse the connection
    timeout = TIMEOUT_S  # seconds per read or send: a host that goes silent (or stops reading) frees its thread

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request on stderr would bury the deploy's output

    def handle_one_request(self) -> None:
        # The request line and headers within HEAD_S, whatever pace the client keeps: past it the connection is
        # shut, and the blocked read returns. parse_request stops the clock once the head is whole.
        self._head = threading.Timer(HEAD_S, self._cut)
        self._head.daemon = True
        self._head.start()
        try:
            super().handle_one_request()
        finally:
            self._head.cancel()

    def parse_request(self) -> bool:
        whole = super().parse_request()
        self._head.cancel()
        return whole

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        match = ENTRY_PATH.fullmatch(self.path)  # exact: no query, no '..', no other directory
        handle = self.server.cache.open_entry(match[1]) if match else None
        if handle is None:
            return self._status(404)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            wanted = byte_range(self.headers.get("Range"), size)
            if wanted == "unsatisfiable":
                return self._status(416, {"Content-Range": f"bytes */{size}"})
            first, last = wanted if isinstance(wanted, tuple) else (0, size - 1)
            self.send_response(206 if isinstance(wanted, tuple) else 200)
            if isinstance(wanted, tuple):
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            if body:
                self._send(handle, match[1], first, last - first + 1)

    def _send(self, handle, sha: str, offset: int, count: int) -> None:
        """sendfile in chunks, counting what the kernel took, so `served` is exact even when a host hangs up."""
        while count > 0:
            try:
                sent = self.connection.sendfile(handle, offset, min(count, SEND_CHUNK))
            except (ConnectionError, socket.timeout):
                self.close_connection = True
                break
            if not sent:
                break
            self.server.count(sha, sent)
            offset, count = offset + sent, count - sent

    def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a host that hangs mid-transfer must not hold the deploy's exit
    request_queue_size = 128  # listen backlog: a fleet's hosts may all connect at once (socketserver's is 5)

    def __init__(self, address: tuple[str, int], cache: ArtifactCache, networks: list[Network]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.cache, self.networks = cache, networks
        self.served: dict[str, int] = {}
        self.open: dict[str, int] = {}  # connections being served, per client address
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def verify_request(self, request, client_address) -> bool:
        """Called as a connection is accepted, before a thread or a byte of the request: the allow-list, then the
        connection caps."""
        peer = client_address[0]
        if not client_allowed(peer, self.networks):
            _refuse(request, "403 Forbidden")
            return False
        with self._lock:
            if self.open.get(peer, 0) >= MAX_PER_CLIENT or sum(self.open.values()) >= MAX_CONNECTIONS:
                _refuse(request, "503 Service Unavailable")
                return False
            self.open[peer] = self.open.get(peer, 0) + 1
        return True

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                left = self.open.get(client_address[0], 1) - 1
                if left:
                    self.open[client_address[0]] = left
                else:
                    self.open.pop(client_address[0], None)

    def count(self, sha: str, sent: int) -> None:
        with self._lock:
            self.served[sha] = self.served.get(sha, 0) + sent


class CacheServer:
    """A context manager: entering starts the server in a thread and gives its base URL; leaving stops it.
    `served` holds the bytes sent per sha256, and stays readable after the exit."""

    def __init__(self, cache: ArtifactCache, bind_address: str, allow: Iterable[str], port: int = 0):
        self.cache, self.bind_address, self.port = cache, bind_address, port
        self.networks = parse_allow(allow)
        if not self.networks:
            raise R1FleetError("the cache server needs an allow-list", field="allow",
                               fix="name the hosts' addresses or network, e.g. 192.168.1.0/24")
        self.served: dict[str, int] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> str:
        try:
            self._server = _Server((self.bind_address, self.port), self.cache, self.networks)
        except OSError as err:
            raise R1FleetError(f"cannot serve the cache on {self.bind_address}:{self.port}: {err.strerror}",
                               fix="give an address of this machine on the hosts' network") from None
        self.served = self._server.served
        # a short poll interval: leaving the block waits for the server's next look at its shutdown flag
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="r1fleet-cache-server", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        return f"http://{host_port(host, port)}"

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None


def serve_cache(cache: ArtifactCache, bind_address: str, allow: list[str], port: int = 0) -> CacheServer:
    """`with serve_cache(cache, "192.168.1.10", ["192.168.1.0/24"]) as base_url:` serves the cache for the
    block's duration, on the address given only (there is no default: never every interface by accident)."""
    return CacheServer(cache, bind_address, allow, port)
