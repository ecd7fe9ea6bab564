"""Who may call the web demo, and how much they may send: an ASGI middleware (`RequestGuard`) in front of
Gradio that answers 403 unless the Host header names this server and an Origin header, when sent, is this same
server (so another web site cannot reach the demo through DNS rebinding), and refuses a request body over
MAX_BODY bytes from its Content-Length before it is read (413; 411 for a chunked body without a length).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable

MAX_UPLOAD = 8 * 2**20  # bytes of an uploaded file (Gradio's max_file_size), far above the model's images
MAX_BODY = MAX_UPLOAD + 2**20  # bytes of any request body: an upload and its multipart framing
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?")  # a Host header's value, lower case


def host_name(value: str) -> str | None:
    """The host name in a Host header's value ("Example.com:80" -> "example.com", "[::1]:7860" -> "::1"),
    or None when it is not a plain host[:port]."""
    match = HOST_HEADER.fullmatch(value.strip().lower())
    return match.group(1).strip("[]").rstrip(".") if match else None


def is_ip_address(name: str) -> bool:
    """True for an IPv4 or IPv6 address literal (which a DNS-rebinding web site cannot put in a Host header)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_names(host: str, allow_hosts: Iterable[str] = ()) -> tuple[frozenset[str], bool]:
    """(host names that name this server, whether any IP address does): localhost, the bound address (or,
    bound to 0.0.0.0, this machine's names and any IP address), and `allow_hosts`."""
    names = set(LOCAL_NAMES) | {h.strip().lower().strip("[]").rstrip(".") for h in allow_hosts}
    any_ip = host in ANY_ADDRESS
    if any_ip:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(host.lower().strip("[]").rstrip("."))
    return frozenset(names), any_ip


def check_request(host: str | None, origin: str | None, names: frozenset[str], any_ip: bool = False
                  ) -> str | None:
    """Why a request with these Host and Origin headers is refused (one sentence), or None to serve it."""
    if host is None:
        return "the request has no Host header; the demo answers only requests that name it"
    name = host_name(host)
    if name is None or not (name in names or (any_ip and is_ip_address(name))):
        return (f"the Host header {host!r} does not name this server; start the demo with "
                f"--allow-host {name or 'NAME'} if you reach it by that name")
    if origin is not None and origin.strip().lower() not in (f"http://{host.strip().lower()}",
                                                              f"https://{host.strip().lower()}"):
        return f"cross-origin requests are refused: Origin {origin!r} is not this server ({host!r})"
    return None


class RequestGuard:
    """ASGI middleware in front of Gradio: `check_request` on every request and websocket, and request
    bodies over `max_body` bytes refused from their Content-Length before they are read."""

    def __init__(self, app: Callable, names: frozenset[str], any_ip: bool = False, max_body: int = MAX_BODY
                 ) -> None:
        self.app, self.names, self.any_ip, self.max_body = app, names, any_ip, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        status, problem = 403, check_request(headers.get("host"), headers.get("origin"), self.names, self.any_ip)
        if problem is None and scope["type"] == "http":
            status, problem = self.body_problem(headers)
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})
        else:
            body = (problem + "\n").encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})

    def body_problem(self, headers: dict[str, str]) -> tuple[int, str | None]:
        """(status, why) for a body over the limit or of unknown length; (200, None) when it may be read."""
        length = headers.get("content-length")
        if length is None:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return 411, "a request body needs a Content-Length"
            return 200, None
        try:
            n = int(length)
        except ValueError:
            return 400, f"the Content-Length {length[:40]!r} is not a number"
        if n > self.max_body:
            return 413, f"the body is {n} bytes; the demo accepts at most {self.max_body}"
        return 200, None
