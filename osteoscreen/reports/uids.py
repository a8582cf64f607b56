"""Deterministic UIDs, so that re-running a job yields the same objects (idempotent delivery)."""
from __future__ import annotations

from pydicom.uid import generate_uid


def derived_uid(*parts: str) -> str:
    """A UID that depends only on `parts`: the same parts always give the same UID.

    Each part is length-prefixed before hashing, so ("ab", "c") and ("a", "bc") differ.
    """
    return str(generate_uid(entropy_srcs=[f"{len(str(p))}:{p}" for p in parts]))
