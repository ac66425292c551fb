"""``target_modules`` regexes, compiled and matched by RE2, a linear-time engine.

Python's ``re`` backtracks: ``(.*.*)*x`` against a 31-character module name runs for minutes
and holds the GIL all along, so a job given such a pattern pins its worker. RE2 matches in
time linear in the name for every pattern it accepts, and refuses the constructs that need
backtracking (backreferences, lookaround) when the options are validated. Torch-free: the API
validates options with it.
"""

from __future__ import annotations

from functools import lru_cache

import re2

MAX_PATTERN_LENGTH = 1000
"""Longest pattern accepted: module-name patterns are short; RE2's program size is bounded too."""


class TargetRegexError(ValueError):
    """A pattern RE2 cannot take, with a message that says why and what to write instead."""


@lru_cache(maxsize=64)
def compile_target_regex(pattern: str) -> re2._Regexp:
    """The compiled pattern; raises ``TargetRegexError`` for one that is too long or not RE2 syntax."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise TargetRegexError(f"target_modules regex is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH} are allowed")
    options = re2.Options()
    options.log_errors = False  # the reason goes into the error message, not through absl to stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise TargetRegexError(
            f"target_modules is not a valid RE2 regular expression ({reason}). Regexes run on RE2, whose matching "
            "time is linear in the module name, so backreferences and lookaround ((?=...), (?!...), (?<=...)) "
            "are not supported; list module names instead, or rewrite the pattern without them"
        ) from None


def fullmatch(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches all of ``name``, as PEFT's ``re.fullmatch(target_modules, name)``."""
    return compile_target_regex(pattern).fullmatch(name) is not None
