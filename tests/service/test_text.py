"""Which characters a URI or a name may not hold (service/text.py), and the tenant names of
LOFTQ_API_KEYS, which are checked with it when the settings load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings
from service.tenants import TENANT_PATTERN, hash_key
from service.text import escape_unsafe, unsafe_character

REFUSED = {
    "\u202a": "U+202A LEFT-TO-RIGHT EMBEDDING",
    "\u202e": "U+202E RIGHT-TO-LEFT OVERRIDE",
    "\u2066": "U+2066 LEFT-TO-RIGHT ISOLATE",
    "\u2069": "U+2069 POP DIRECTIONAL ISOLATE",
    "\u200b": "U+200B ZERO WIDTH SPACE",
    "\u200f": "U+200F RIGHT-TO-LEFT MARK",
    "\ufeff": "U+FEFF ZERO WIDTH NO-BREAK SPACE",
    "\u2028": "U+2028 LINE SEPARATOR",
    "\u2029": "U+2029 PARAGRAPH SEPARATOR",
    "\U000e0041": "U+E0041 TAG LATIN CAPITAL LETTER A",
    "\x00": "U+0000 (a control character)",
    "\n": "U+000A (a control character)",
    "\x1b": "U+001B (a control character)",
    "\x7f": "U+007F (a control character)",
    "\x85": "U+0085 (a control character)",
    "\ud800": "U+D800 (a surrogate)",
}


@pytest.mark.parametrize("character", list(REFUSED), ids=[d.split(" ", 1)[0] for d in REFUSED.values()])
def test_format_control_and_separator_characters_are_named(character: str) -> None:
    assert unsafe_character(f"models/llama{character}/x{character}") == REFUSED[character]
    assert character not in escape_unsafe(f"a{character}b")


@pytest.mark.parametrize("text", ["s3://models/llama-3/", "équipe/modèle", "日本語", "emoji-🙂", "tab-free text", ""])
def test_ordinary_text_passes(text: str) -> None:
    assert unsafe_character(text) is None
    assert escape_unsafe(text) == text


def test_escaping_keeps_the_rest() -> None:
    assert escape_unsafe("ok\u202etxt.exe\nINFO forged") == "ok\\u202etxt.exe\\nINFO forged"


@pytest.mark.parametrize(
    ("tenant", "named"),
    [("team\u202ea", "U+202E RIGHT-TO-LEFT OVERRIDE"), ("team-a\n", "U+000A"), ("team\u200b", "U+200B ZERO WIDTH SPACE")],
)
def test_api_key_tenants_with_format_characters_stop_the_settings(tenant: str, named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_keys=f"{tenant}:{hash_key('some-key')}")
    assert named in str(caught.value)
    assert "\u202e" not in str(caught.value) and "\u200b" not in str(caught.value)  # the name is escaped


def test_tenant_pattern_takes_no_trailing_newline() -> None:
    """``$`` matches before a final newline; the pattern must not (it also guards hash-key)."""
    assert TENANT_PATTERN.match("team-a") and not TENANT_PATTERN.match("team-a\n")
