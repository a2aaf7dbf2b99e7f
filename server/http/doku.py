"""What DOKU's endpoints share: bounded read, authentication, and signed answers in DOKU's shape.

Order of checks: body size (413, before we hold the bytes), signature + Client-Id + timestamp (401),
Request-Id, media type (415), then the endpoint's own parsing. Everything after authentication is signed;
a caller we could not authenticate gets an unsigned answer (we cannot know whom to sign for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from server.config import Settings
from server.core.errors import DipcError, InvalidField
from server.core.times import utcnow
from server.doku import conventions
from server.doku.auth import Authenticated, authenticate, signed_headers
from server.http.bodies import JSON, read_bounded, require_json
from server.http.keys import DOKU_AUTH, ERROR_RENDERER, LOG_FIELDS
from server.ops.masking import is_clean_text


@dataclass(frozen=True)
class DokuEndpoint:
    settings: Settings
    target: str  # the public path DOKU calls, part of every signature
    max_age_s: float
    max_future_s: float
    render_error: Callable[[DipcError], bytes]

    async def receive(self, request: web.Request) -> tuple[Authenticated, bytes]:
        """The verified caller and the exact body bytes, or a DipcError rendered in DOKU's shape.

        Call :meth:`check_request` next: its errors come after authentication, so they are signed.
        """
        request[ERROR_RENDERER] = self._error_response
        body = await read_bounded(request, self.settings.max_body_bytes)
        auth = authenticate(
            request.headers,
            body,
            target=self.target,
            clients=self.settings.clients,
            now=utcnow(),
            max_age_s=self.max_age_s,
            max_future_s=self.max_future_s,
        )
        request[DOKU_AUTH] = auth
        request[LOG_FIELDS]["client_id"] = auth.client.client_id
        if auth.key_index:
            request[LOG_FIELDS]["signed_with_key"] = auth.key_index
        return auth, body

    def check_request(self, request: web.Request, auth: Authenticated) -> None:
        """What an authenticated request must also be: a usable Request-Id, a JSON body."""
        if len(auth.request_id) > conventions.REQUEST_ID_MAX_LENGTH:
            limit = conventions.REQUEST_ID_MAX_LENGTH
            raise InvalidField("Request-Id", f"must be at most {limit} characters")
        if not is_clean_text(auth.request_id) or not auth.request_id.isprintable():
            # It keys the inquiry record; bytes that are not UTF-8 (or NUL) cannot be stored as sent.
            raise InvalidField("Request-Id", "must be UTF-8 text without control characters")
        require_json(request)

    def respond(self, request: web.Request, status: int, body: bytes) -> web.Response:
        """Our answer, signed for the authenticated caller (unsigned when there is none)."""
        auth = request.get(DOKU_AUTH)
        headers = None
        if auth is not None:
            headers = signed_headers(
                auth.client,
                request_id=auth.request_id,
                target=self.target,
                body=body,
                now=utcnow(),
                response=True,
            )
        return web.Response(status=status, body=body, content_type=JSON, headers=headers)

    async def refuse_method(self, request: web.Request) -> web.StreamResponse:
        """Any method but POST on DOKU's path: aiohttp's 405, rendered in DOKU's shape (the middleware)."""
        request[ERROR_RENDERER] = self._error_response
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])

    def _error_response(self, request: web.Request, error: DipcError) -> web.Response:
        return self.respond(request, error.http_status, self.render_error(error))
