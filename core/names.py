"""Model and version names that are safe to use as path components and object-store keys.

Model names and versions arrive from clients (URLs, protobuf fields), from the object store
(``models/{name}/{version}/``) and from release records, and all of them end up joined into
filesystem paths (the site's model repository) and store keys. One rule set, used by the
gateway, the store and the sync agent, keeps ``../../etc`` and friends out everywhere.

Each check returns ``""`` when the value is fine, otherwise an operator-readable reason; the
``check_*`` variants raise :class:`InvalidNameError` with that reason instead.

Rules
- model name: 1..MAX_MODEL_NAME_LEN characters from ``A-Z a-z 0-9 _ - .``; must start with a
  letter, digit or underscore (no leading dot or dash: hidden files, CLI options); never
  ``..`` anywhere; no ``/``, ``\\``, NUL or other control characters (covered by the charset,
  but named explicitly in the reason because those are the attacks).
- version: a positive integer in canonical decimal form (``"1"``, ``"42"``; not ``"0"``,
  ``"01"``, ``"+1"``, ``"1.0"``, ``" 1"``), at most MAX_VERSION_DIGITS digits (fits int64),
  which is exactly what Triton accepts as a version directory.

Triton's own texts where Triton refuses a version too (so a client sees what it would see from
Triton directly; Triton parses a version with ``std::stol``, core's ``ParseModelVersion``):
- nothing a number can be read from ("abc", "..", or past int64): "failed to get model version
  from specified version string 'abc' (details: stol), version should be an integral value > 0";
- a negative number: "invalid model version specified '-1' , version should be an integral
  value > 0".
Versions Triton would read leniently ("+1", "01", " 1", "1.0": stol stops at the first
non-digit) keep the stricter rule above with geogate's reason; every text shows at most
SHOWN_VERSION_CHARS characters of the client's value.
"""

from __future__ import annotations

import functools
import re

MAX_MODEL_NAME_LEN = 128
MAX_VERSION_DIGITS = 18  # < 2**63: fits Triton's int64 version numbers
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
# What std::stol reads: leading C-locale whitespace, an optional sign, then ASCII digits.
_STOL_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
_INT64_MAX = 2**63 - 1
SHOWN_VERSION_CHARS = 64  # a client's version echoed in a reason is cut here (logs, headers)
# Characters named in reasons because they are what a traversal attempt uses.
_PATH_CHARS = {"/": "'/'", "\\": "'\\\\'", "\x00": "NUL"}


class InvalidNameError(ValueError):
    """A model name or version that must not be used; the message says why."""


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _non_empty_str_problem(value: object, what: str) -> str:
    """Why `value` is not a non-empty string ("" when it is); `what` names it in the reason."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not value:
        return f"{what} is empty"
    return ""


def model_name_problem(name: object) -> str:
    """Why `name` is not a usable model name ("" when it is)."""
    problem = _non_empty_str_problem(name, "model name")
    if problem:
        return problem
    if len(name) > MAX_MODEL_NAME_LEN:
        return f"model name {_shown(name)} is {len(name)} characters long (at most {MAX_MODEL_NAME_LEN})"
    for ch, label in _PATH_CHARS.items():
        if ch in name:
            return f"model name {_shown(name)} contains {label} (path separators and NUL are not allowed)"
    if ".." in name:
        return f"model name {_shown(name)} contains '..' (path traversal)"
    if name[0] in ".-":
        return f"model name {_shown(name)} starts with {name[0]!r} (must start with a letter, digit or '_')"
    if _MODEL_NAME_RE.fullmatch(name) is None:
        bad = next(c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-")))
        return (f"model name {_shown(name)} contains {bad!r}; allowed characters are "
                "A-Z a-z 0-9 '_' '-' '.'")
    return ""


def version_problem(version: object) -> str:
    """Why `version` is not a usable model version ("" when it is)."""
    problem = _non_empty_str_problem(version, "model version")
    if problem:
        return problem
    triton = _triton_version_problem(version)
    if triton:
        return triton
    if len(version) > MAX_VERSION_DIGITS:
        return f"model version {_shown(version)} is too long (at most {MAX_VERSION_DIGITS} digits)"
    if _VERSION_RE.fullmatch(version) is None:
        return (f"model version {_shown(version)} is not a positive integer "
                "(digits only, no sign, no leading zeros, not 0)")
    return ""


def _triton_version_problem(version: str) -> str:
    """Triton's text when Triton itself refuses `version` ("" when std::stol reads a number >= 0)."""
    shown = version if len(version) <= SHOWN_VERSION_CHARS else version[:SHOWN_VERSION_CHARS] + "..."
    m = _STOL_RE.match(version)
    # (more than 19 digits cannot fit; int() is not even tried on those: CPython caps its length)
    if m is None or len(m.group(2).lstrip("0")) > 19 or \
            not -_INT64_MAX - 1 <= int(m.group(1) + m.group(2)) <= _INT64_MAX:
        # std::stol threw invalid_argument / out_of_range; libstdc++'s what() is "stol"
        return (f"failed to get model version from specified version string '{shown}' (details: stol), "
                "version should be an integral value > 0")
    if m.group(1) == "-" and int(m.group(2)) > 0:
        return f"invalid model version specified '{shown}' , version should be an integral value > 0"
    return ""


def check_model_name(name: object) -> str:
    """`name` itself when valid; InvalidNameError naming the problem otherwise."""
    problem = model_name_problem(name)
    if problem:
        raise InvalidNameError(problem)
    return name  # type: ignore[return-value]


def check_version(version: object) -> str:
    """`version` itself when valid; InvalidNameError naming the problem otherwise."""
    problem = version_problem(version)
    if problem:
        raise InvalidNameError(problem)
    return version  # type: ignore[return-value]


def model_ref_problem(name: object, version: object | None) -> str:
    """Both at once, for request paths: `version` None means "no version given" (allowed)."""
    return model_name_problem(name) or ("" if version is None else version_problem(version))


@functools.lru_cache(maxsize=4096)
def cached_model_ref_problem(name: str, version: str | None) -> str:
    """`model_ref_problem` for the request path: clients repeat the same few names, so the
    answer is remembered (bounded: a flood of distinct names only evicts)."""
    return model_ref_problem(name, version)
