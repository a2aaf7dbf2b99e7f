"""Casework: closing the exceptions, the money dipc could not simply accept (spec §9).

A ``conflict`` or ``anomaly`` payment is an *exception*, open until finance resolves it once:
``refunded`` (money returned), ``accepted`` (the merchant keeps it and honours the payment) or
``dismissed`` (no money moved). A resolution is final: the same one again answers what was stored, a
different one is refused (409), and PostgreSQL refuses to update or delete one.

The transaction takes the locks in the notification path's order (the code's row, then the outbox's
advisory lock), so a resolution and a notification of one code never deadlock and never interleave.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from server.core.codes import PaymentCode
from server.core.documents import code_document, iso
from server.core.errors import AlreadyResolved, NotFound, ValidationFailed
from server.core.manage import Page, page_limit
from server.core.outcomes import CodeStatus
from server.core.payments import EXCEPTION_KINDS, EXCEPTION_REASONS, Payment, PaymentKind
from server.core.resolutions import PaymentResolution, Resolution, ResolutionRequest
from server.core.text import has_control
from server.store import casework as store
from server.store import codes as code_store
from server.store import outbox

RESOLVED_EVENT = "exception.resolved"

RESOLVED_BY_MAX_LENGTH = 200
NOTE_MAX_LENGTH = 2000
REFERENCE_MAX_LENGTH = 200
MAX_PAYMENT_ID = 2**63 - 1


class CaseState(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Case:
    """An exception: the payment, and its resolution once it has one."""

    payment: Payment
    resolution: PaymentResolution | None

    @property
    def state(self) -> CaseState:
        return CaseState.OPEN if self.resolution is None else CaseState.RESOLVED

    def document(self) -> dict[str, Any]:
        payment, resolution = self.payment, self.resolution
        return {
            "payment_id": payment.id,
            "payment_code": payment.payment_code,
            "invoice_number": payment.invoice_number,
            "amount": payment.amount,
            "expected_amount": payment.expected_amount,
            "kind": payment.kind,
            "reason": payment.reason,
            "state": self.state.value,
            "recorded_at": iso(payment.recorded_at),
            "client_id": payment.client_id,
            "channel": payment.channel,
            "transaction_ref": payment.transaction_ref,
            "paid_at": iso(payment.paid_at),
            "source": payment.source,
            "agent_id": payment.agent_id,
            "agent_store_id": payment.agent_store_id,
            "agent_trx_id": payment.agent_trx_id,
            "resolution": resolution.resolution if resolution else None,
            "resolved_by": resolution.resolved_by if resolution else None,
            "note": resolution.note if resolution else None,
            "reference": resolution.reference if resolution else None,
            "code_paid": resolution.code_paid if resolution else None,
            "resolved_at": iso(resolution.resolved_at) if resolution else None,
        }


# --- parsing ---------------------------------------------------------------------------------------


def _text(
    raw: Mapping[str, Any], name: str, problems: dict[str, str], *, max_length: int, prose: bool = False
) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        problems[name] = "must be a string"
        return None
    if len(value) > max_length:
        problems[name] = f"must be at most {max_length} characters"
        return None
    if has_control(value, prose=prose):  # names and references are one line, a note is prose
        allowed = " (line breaks and tabs are allowed)" if prose else ""
        problems[name] = f"must not contain control characters{allowed}"
        return None
    return value


def parse_resolution(raw: Mapping[str, Any]) -> ResolutionRequest:
    """A resolution request, or :class:`ValidationFailed` naming every field that is wrong."""
    problems: dict[str, str] = {}
    for name in sorted(set(raw) - {"resolution", "resolved_by", "note", "reference"}):
        problems[name] = "is not a field of a resolution"
    resolution: Resolution | None = None
    if "resolution" not in raw or raw["resolution"] is None:
        problems["resolution"] = "is required: refunded, accepted or dismissed"
    elif not isinstance(raw["resolution"], str) or raw["resolution"] not in set(Resolution):
        problems["resolution"] = "must be refunded, accepted or dismissed"
    else:
        resolution = Resolution(raw["resolution"])
    resolved_by = _text(raw, "resolved_by", problems, max_length=RESOLVED_BY_MAX_LENGTH)
    if "resolved_by" not in problems and not (resolved_by or "").strip():
        problems["resolved_by"] = "is required: who resolved it"
    note = _text(raw, "note", problems, max_length=NOTE_MAX_LENGTH, prose=True)
    if "note" not in problems and note is None:
        problems["note"] = "is required (it may be empty)"
    reference = _text(raw, "reference", problems, max_length=REFERENCE_MAX_LENGTH)
    if problems:
        raise ValidationFailed(problems)
    assert resolution is not None
    assert resolved_by is not None
    assert note is not None
    return ResolutionRequest(resolution, resolved_by.strip(), note, (reference or "").strip() or None)


def accepting_pays_code(payment: Payment, code: PaymentCode | None, now: datetime) -> bool:
    """Whether accepting this exception marks its code paid, as the payment would have (spec §9).

    Only an anomaly of a one-shot code of the same merchant that is still payable: active and not
    expired now. A conflict's bill is paid already; a reusable code has no single bill to close.
    """
    return (
        payment.kind == PaymentKind.ANOMALY
        and code is not None
        and not code.reusable
        and code.client_id == payment.client_id
        and code.status is CodeStatus.ACTIVE
        and not code.is_expired(now)
    )


# --- the queue ---------------------------------------------------------------------------------------


def _choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise ValidationFailed({name: f"must be one of {', '.join(allowed)}"})
    return value


async def list_cases(
    pool: asyncpg.Pool,
    *,
    state: str | None = None,
    kind: str | None = None,
    reason: str | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> Page[Case]:
    """Exceptions oldest first (payment-id order), filtered, after the cursor ``after``."""
    _choice("state", state, tuple(member.value for member in CaseState))
    _choice("kind", kind, tuple(member.value for member in EXCEPTION_KINDS))
    reasons = sorted({r.value for kind_reasons in EXCEPTION_REASONS.values() for r in kind_reasons})
    _choice("reason", reason, tuple(reasons))
    if after is not None and not 0 <= after <= MAX_PAYMENT_ID:
        raise ValidationFailed({"after": "must be a payment id"})
    size = page_limit(limit)
    rows = await store.list_page(pool, state=state, kind=kind, reason=reason, after=after, limit=size + 1)
    cases = [Case(payment, resolution) for payment, resolution in rows]
    return Page.of(cases, size, lambda case: str(case.payment.id))


async def get_case(pool: asyncpg.Pool, payment_id: int) -> Case:
    payment = await store.get_payment(pool, payment_id)
    if payment is None or payment.kind not in EXCEPTION_KINDS:
        raise NotFound(f"payment {payment_id} is not an exception")
    return Case(payment, await store.get(pool, payment.payment_code, payment.id))


@dataclass(frozen=True, slots=True)
class ResolveResult:
    case: Case
    created: bool  # False: the same resolution was stored before; nothing changed now


async def resolve(
    pool: asyncpg.Pool, payment_id: int, request: ResolutionRequest, *, now: datetime
) -> ResolveResult:
    """Resolve an exception once, with its effect and its event, in one transaction."""
    if not 0 < payment_id <= MAX_PAYMENT_ID:
        raise NotFound(f"payment {payment_id} is not an exception")
    async with outbox.transaction(pool) as conn:
        payment = await store.get_payment(conn, payment_id)
        if payment is None or payment.kind not in EXCEPTION_KINDS:
            raise NotFound(f"payment {payment_id} is not an exception")
        if request.resolution is Resolution.ACCEPTED and payment.amount <= 0:
            # DOKU said SUCCESS for no money (an anomaly, spec §4 rule 5): nothing to keep, no bill to pay.
            raise ValidationFailed(
                {"resolution": "cannot be accepted: the payment is of 0 rupiah or less; dismiss or refund it"}
            )
        # The code's row lock first, as a notification takes it: resolutions of one code, and the
        # notifications that could pay it meanwhile, happen one after the other.
        code = await code_store.get(conn, payment.payment_code, for_update=True)
        pays = request.resolution is Resolution.ACCEPTED and accepting_pays_code(payment, code, now)
        stored = await store.insert(conn, payment, request, code_paid=pays)
        if stored is None:
            # Resolved before (or by a twin that committed while we waited on the lock).
            existing = await store.get(conn, payment.payment_code, payment.id)
            assert existing is not None
            if existing.resolution != request.resolution.value:
                raise AlreadyResolved(
                    f"payment {payment_id} was resolved as {existing.resolution} by {existing.resolved_by} "
                    f"at {iso(existing.resolved_at)}; resolutions are final"
                )
            outbox.replayed()  # answered as the first resolution was: once its event is in the feed
            return ResolveResult(Case(payment, existing), created=False)
        if pays:
            assert code is not None
            code = await code_store.count_payment(conn, code.payment_code)
        case = Case(payment, stored)
        document = case.document() | {"code": code_document(code) if code else None}
        await outbox.append(conn, RESOLVED_EVENT, payment.payment_code, document)
    return ResolveResult(case, created=True)
