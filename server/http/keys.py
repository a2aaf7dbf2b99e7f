"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from aiohttp import web

from server.config import Settings
from server.core.errors import DipcError
from server.doku.auth import Authenticated
from server.doku.checkstatus import CheckStatusClient
from server.ops.health import HealthChecker
from server.store.inquiries import InquiryBatches
from server.store.listener import EventListener
from server.store.payments import PaymentBatches

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
# The worker's inquiries on their way to the database, recorded in batches over POOL.
INQUIRY_BATCHES = web.AppKey("inquiry_batches", InquiryBatches)
PAYMENT_BATCHES = web.AppKey("payment_batches", PaymentBatches)
LISTENER = web.AppKey("listener", EventListener)
HEALTH = web.AppKey("health", HealthChecker)
# DOKU's Check Status API, when this deployment has one (DIPC_DOKU_API_URL; --demo has none by default).
CHECK_STATUS = web.AppKey("check_status", CheckStatusClient)

# Set by a route family that renders its errors in its own shape (DOKU's), read by the error middleware.
ERROR_RENDERER = web.RequestKey("error_renderer", Callable[[web.Request, DipcError], web.StreamResponse])
# The verified DOKU caller: responses to it are signed; without it they cannot be.
DOKU_AUTH = web.RequestKey("doku_auth", Authenticated)
# Fields a handler adds to the request's one log line (outcome, masked payment code, …).
LOG_FIELDS = web.RequestKey("log_fields", dict[str, Any])
