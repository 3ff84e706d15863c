"""The cluster token: what every service asks for when it listens anywhere but loopback.

On 127.0.0.1 only this machine can connect, so services run open there. Bound to any other address they
refuse to start without a cluster token, and then answer protected routes only to requests carrying
``Authorization: Bearer <token>``, compared in constant time. The token comes from the environment
(``BLOCK_CLUSTER_TOKEN``) or a file (``BLOCK_CLUSTER_TOKEN_FILE``), never from argv, where ``ps`` shows
it to every user. It lives in ``store``, the lowest layer, because the collector needs it as much as
the services in ``block`` do.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

import orjson

TOKEN_ENV = "BLOCK_CLUSTER_TOKEN"
TOKEN_FILE_ENV = "BLOCK_CLUSTER_TOKEN_FILE"
ADMIN_TOKEN_ENV = "BLOCK_ADMIN_TOKEN"
ADMIN_TOKEN_FILE_ENV = "BLOCK_ADMIN_TOKEN_FILE"


def secret_from_env(env: str, file_env: str, what: str) -> str | None:
    """A secret from the variable ``env`` or the file ``file_env`` names; None when neither is set. A file
    that is named but unreadable or empty is an error, not a silent "no secret"."""
    value = os.environ.get(env)
    if value:
        return value.strip()
    path = os.environ.get(file_env)
    if not path:
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{file_env}={path}: cannot read the {what}: {exc}") from exc
    if not text:
        raise ValueError(f"{file_env}={path}: the token file is empty")
    return text


def cluster_token() -> str | None:
    return secret_from_env(TOKEN_ENV, TOKEN_FILE_ENV, "cluster token")


def admin_token() -> str | None:
    """The scheduler's admin token (its own secret: admin rights are not every service's)."""
    return secret_from_env(ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV, "admin token")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_for(host: str, service: str) -> str | None:
    """The token a service bound to ``host`` must demand: None on loopback (unless one is configured),
    and a clear error off loopback when none is configured."""
    token = cluster_token()
    if token is None and not is_loopback(host):
        raise ValueError(f"{service}: refusing to listen on {host} without a cluster token; set {TOKEN_ENV} "
                         f"or {TOKEN_FILE_ENV} (never a command-line flag), or bind 127.0.0.1")
    return token


def authorized(header: str | None, token: str) -> bool:
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())


class TokenGuard:
    """ASGI middleware: requests to ``protected`` path prefixes need the cluster token (401 otherwise)."""

    def __init__(self, app, token: str | None, protected: Sequence[str] = ("/",)):
        self.app = app
        self.token = token
        self.protected = tuple(protected)

    async def __call__(self, scope, receive, send) -> None:
        if self.token is None or scope["type"] != "http" or not scope["path"].startswith(self.protected):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if authorized(header, self.token):
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"error": {"message": "missing or wrong cluster token", "type": "AuthenticationError",
                                       "param": None, "code": 401}})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
