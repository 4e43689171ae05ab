"""Check --json output against the documented JSON Schema (cli/common.py JSON_SCHEMA).

A small validator for the keywords that schema uses; an unknown keyword is an error, so the
schema cannot grow a rule that this check silently skips.
"""

from __future__ import annotations

import json
from typing import Any

from mergekit_rl.cli.common import JSON_SCHEMA

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "boolean": bool,
    "number": (int, float),
}
_IGNORED = {"$schema", "title", "description"}


def errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Every way `value` breaks `schema` (empty when it conforms)."""
    out: list[str] = []
    for key, rule in schema.items():
        if key in _IGNORED or key in ("then", "else"):
            continue
        if key == "type":
            ok = isinstance(value, _TYPES[rule]) and not (
                rule in ("integer", "number") and isinstance(value, bool)
            )
            if not ok:
                out.append(f"{where}: {value!r} is not of type {rule}")
        elif key == "const":
            if value != rule or type(value) is not type(rule):
                out.append(f"{where}: {value!r} is not {rule!r}")
        elif key == "minLength":
            if isinstance(value, str) and len(value) < rule:
                out.append(f"{where}: shorter than {rule}")
        elif key == "minimum":
            if isinstance(value, int | float) and value < rule:
                out.append(f"{where}: {value} < {rule}")
        elif key == "required":
            if isinstance(value, dict):
                out += [f"{where}: missing key {k!r}" for k in rule if k not in value]
        elif key == "properties":
            if isinstance(value, dict):
                for k, sub in rule.items():
                    if k in value:
                        out += errors(value[k], sub, f"{where}.{k}")
        elif key == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    out += errors(item, rule, f"{where}[{i}]")
        elif key == "not":
            if not errors(value, rule, where):
                out.append(f"{where}: matches a forbidden schema {rule}")
        elif key == "if":
            branch = "then" if not errors(value, rule, where) else "else"
            if branch in schema:
                out += errors(value, schema[branch], where)
        else:
            raise AssertionError(f"the test validator does not know the keyword {key!r}")
    return out


def _refuse(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON (RFC 8259); print null instead")


def check(stdout: str, command: str, ok: bool = True) -> dict[str, Any]:
    """Parse stdout as exactly one JSON object, validate it, and check command and ok."""
    data = json.loads(stdout, parse_constant=_refuse)  # strict: no NaN / Infinity
    problems = errors(data, JSON_SCHEMA)
    assert not problems, problems
    assert data["command"] == command and data["ok"] is ok, (data["command"], data["ok"])
    return data
