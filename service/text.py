"""Characters a client must not put in a URI or a name.

Unicode format characters (category Cf: the bidi overrides U+202A–U+202E and isolates
U+2066–U+2069, zero-width U+200B–U+200F, U+FEFF, ...) make text display differently from what
it is, control characters (Cc) and the line and paragraph separators (Zl, Zp) break log lines
and terminals, and lone surrogates (Cs) are no text at all. A name or URI that holds one is
refused where it arrives; logs escape them anyway (``escape_unsafe``).
"""

from __future__ import annotations

import unicodedata

UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _unsafe(character: str) -> bool:
    return unicodedata.category(character) in UNSAFE_CATEGORIES


def describe(character: str) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE``; control characters and surrogates have no Unicode name."""
    kind = "a control character" if unicodedata.category(character) == "Cc" else "a surrogate"
    name = unicodedata.name(character, "") or f"({kind})"
    return f"U+{ord(character):04X} {name}"


def unsafe_character(value: str) -> str | None:
    """The first format, control or separator character of ``value``, described (None: none)."""
    return next((describe(character) for character in value if _unsafe(character)), None)


def unsafe_message(value: str) -> str | None:
    """Why ``value`` is refused, for an error message after the field's name (None: it is fine)."""
    found = unsafe_character(value)
    if found is None:
        return None
    return f"contains {found} (Unicode format, control and line-separator characters are not allowed)"


def escape_unsafe(value: str) -> str:
    """``value`` with each unsafe character written as ``\\uXXXX``: what logs print instead."""
    if not any(_unsafe(character) for character in value):
        return value
    return "".join(character.encode("unicode_escape").decode("ascii") if _unsafe(character) else character for character in value)
