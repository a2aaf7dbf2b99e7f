"""Reconciliation with DOKU's Check Status, as a background task of every serving process (spec §8)."""
