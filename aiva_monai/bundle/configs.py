"""Small helpers for config expressions: a handler of a list by type, a mapping without its None values."""

from __future__ import annotations

__all__ = ["handler_of", "present"]


def handler_of(handlers, type_name: str):
    """The handler of ``handlers`` whose class is named ``type_name``, or None (it is switched off): configs refer
    to a handler of a list by what it is, not by its position in the list."""
    found = [h for h in handlers if type(h).__name__ == type_name]
    if len(found) > 1:
        raise ValueError(f"{len(found)} handlers of type {type_name} in the list: name one by position instead.")
    return found[0] if found else None


def present(mapping: dict) -> dict:
    """``mapping`` without its None values: a method overlay sets the checkpoint entries it does not use
    (e.g. AIVA's clustering state) to None, and the savers / loaders get the rest."""
    return {key: value for key, value in dict(mapping).items() if value is not None}
