"""Delivering events to the merchant's backend: signed POSTs, retried with backoff, in order per code."""
