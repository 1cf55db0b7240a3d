"""Who may call the gateway: optional API keys, a separate admin key for /pythia/*, per-key rate limits.

Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key (no
early exit), so timing says nothing about how much of a key matched. A key is never logged and
never used as a Redis key: callers are known by `key_id`, a short digest.

Which key each path needs:
  /health, /ready, /metrics   none (probes and Prometheus)
  /pythia/*                   the admin key when PYTHIA_ADMIN_API_KEY is set, else as /v1/*
  /v1/*                       one of PYTHIA_API_KEYS when set, else none
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import error_body
from gateway.ratelimit import RateLimiter, retry_after_header
from gateway.settings import Settings

log = logging.getLogger("pythia.access")

KEY_ID = "pythia.key_id"  # request[KEY_ID]: the caller's key id (set by the middleware)
RAW_BODY = "pythia.raw_body"  # request[RAW_BODY]: the body as received, kept only with PYTHIA_LOG_PAYLOADS
ANONYMOUS = "anonymous"  # the key id of every call when no API keys are configured
OPEN_PATHS = frozenset(("/health", "/ready", "/metrics"))
COMPLETION_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def key_id(key: str | bytes) -> str:
    """A short, non-reversible name for a key: for rate-limit buckets and logs."""
    return (
        "k_"
        + hashlib.sha256(b"pythia-key-id:" + (key.encode() if isinstance(key, str) else key)).hexdigest()[:16]
    )


def parse_keys(text: str) -> list[str]:
    """API keys from PYTHIA_API_KEYS: comma-, space- or newline-separated."""
    return [k for k in text.replace(",", " ").split() if k]


def unauthorized(message: str) -> web.Response:
    """401 `invalid_api_key`, OpenAI-shaped."""
    return web.Response(
        status=401,
        body=error_body(401, "invalid_api_key", message),
        content_type="application/json",
        headers={"WWW-Authenticate": 'Bearer realm="pythia"'},
    )


def rate_limited(limit: str, wait_s: float) -> web.Response:
    """429 `rate_limit_exceeded` with Retry-After, OpenAI-shaped."""
    per = "requests" if limit == "requests" else "tokens"
    return web.Response(
        status=429,
        body=error_body(
            429, "rate_limit_exceeded", f"Rate limit reached for {per} per minute; retry after {wait_s:.1f}s"
        ),
        content_type="application/json",
        headers={"Retry-After": retry_after_header(wait_s)},
    )


class Access:
    """API keys, admin key and rate limits of one gateway worker (all optional; off by default)."""

    def __init__(self, settings: Settings) -> None:
        keys = parse_keys(settings.api_keys.get_secret_value())
        self._keys = [(_digest(k), key_id(k)) for k in keys]
        admin = settings.admin_api_key.get_secret_value().strip()
        self._admin = _digest(admin) if admin else None
        self.log_payloads = settings.log_payloads
        self.limiter = RateLimiter(
            settings.rate_limit_rpm,
            settings.rate_limit_tpm,
            settings.redis_url,
            settings.redis_key_prefix,
            settings.rate_limit_redis_timeout_s,
        )

    @property
    def needs_key(self) -> bool:
        return bool(self._keys)

    @property
    def has_admin_key(self) -> bool:
        return self._admin is not None

    def identify(self, authorization: str | None) -> str | None:
        """The key id of a valid API key in an `Authorization: Bearer` header, else None."""
        token = _bearer(authorization)
        if token is None:
            return None
        d = _digest(token)
        found: str | None = None
        for digest, kid in self._keys:  # every key, no early exit: constant time in which key matched
            if hmac.compare_digest(d, digest):
                found = kid
        return found

    def is_admin(self, authorization: str | None) -> bool:
        token = _bearer(authorization)
        return (
            self._admin is not None and token is not None and hmac.compare_digest(_digest(token), self._admin)
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate every call; rate-limit /v1 calls other than completions (those: `limit()`)."""
        path = request.path
        if path in OPEN_PATHS:
            return await handler(request)
        auth = request.headers.get("Authorization")
        if path.startswith("/pythia/") and self._admin is not None:
            if not self.is_admin(auth):
                return unauthorized("This endpoint needs the admin API key (Authorization: Bearer <key>)")
            return await handler(request)
        if self._keys:
            kid = self.identify(auth)
            if kid is None:
                if _bearer(auth) is None:
                    return unauthorized("You didn't provide an API key (Authorization: Bearer <key>)")
                return unauthorized("Incorrect API key provided")
        else:
            kid = ANONYMOUS
        request[KEY_ID] = kid
        if self.log_payloads and request.method == "POST":
            try:  # the body is cached: the handler reads the same bytes again without I/O
                request[RAW_BODY] = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return web.Response(
                    status=413,
                    body=error_body(413, "request_too_large", "request body is too large"),
                    content_type="application/json",
                )
        if self.limiter.enabled and path.startswith("/v1/") and path not in COMPLETION_PATHS:
            verdict = await self.limiter.take(kid, 0)
            if not verdict.allowed:
                return rate_limited(verdict.limit, verdict.retry_after_s)
        return await handler(request)

    async def limit(self, request: web.Request, tokens: int) -> web.Response | None:
        """Admit one completion of about `tokens` tokens (prompt + max_tokens) for its caller; 429 if over."""
        if not self.limiter.enabled:
            return None
        verdict = await self.limiter.take(request.get(KEY_ID, ANONYMOUS), tokens)
        if verdict.allowed:
            return None
        return rate_limited(verdict.limit, verdict.retry_after_s)

    async def close(self) -> None:
        await self.limiter.close()

    def log_payload(self, request: web.Request, answer: bytes) -> None:
        """Log one call's prompt and completion text (only installed with PYTHIA_LOG_PAYLOADS=true)."""
        prompt, completion = prompt_text(request.get(RAW_BODY, b"")), completion_text(answer)
        log.info(
            "payload",
            extra={
                "key_id": request.get(KEY_ID, ANONYMOUS),
                "path": request.path,
                "prompt": prompt,
                "completion": completion,
            },
        )


def install_access(app: web.Application, gw: Any) -> Access:
    """Add API-key checks (middleware) and, when limits are set, the rate-limit hook to an app and its Gateway."""
    settings: Settings = gw.settings
    access = Access(settings)
    if access.needs_key or access.has_admin_key or access.limiter.enabled or access.log_payloads:
        app.middlewares.append(access.middleware)  # nothing added to the hot path otherwise
    if access.log_payloads:
        gw.log_payload = access.log_payload
    if access.limiter.enabled:
        gw.rate_limit = access.limit

    async def close(app: web.Application) -> None:
        await access.close()

    app.on_cleanup.append(close)
    return access


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def prompt_text(raw: bytes) -> str:
    """The prompt of a completion request body: chat messages' text joined by newlines, or `prompt`."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    p = body.get("prompt")
    return p if isinstance(p, str) else orjson.dumps(p).decode() if p is not None else ""


def completion_text(answer: bytes) -> str:
    """The generated text of a JSON answer or of SSE events (`choices[].message|delta.content` or `.text`)."""
    docs: list[Any] = []
    if answer.lstrip()[:1] == b"{":
        with contextlib.suppress(orjson.JSONDecodeError):
            docs.append(orjson.loads(answer))
    else:
        for line in answer.split(b"\n"):
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    docs.append(orjson.loads(line[5:]))
    out: list[str] = []
    for d in docs:
        for c in d.get("choices") or () if isinstance(d, dict) else ():
            if not isinstance(c, dict):
                continue
            msg = c.get("message") or c.get("delta")
            text = msg.get("content") if isinstance(msg, dict) else c.get("text")
            if isinstance(text, str):
                out.append(text)
    return "".join(out)
