"""Masking customer data for logs."""

from __future__ import annotations


def mask_code(payment_code: str) -> str:
    """A payment code with all but its last four digits hidden: ``************8123``."""
    if len(payment_code) <= 4:
        return "*" * len(payment_code)
    return "*" * (len(payment_code) - 4) + payment_code[-4:]
