"""Check REST replies against Discord's OpenAPI schemas, strictly: a field the spec does not name is an error.

The spec's object schemas allow unknown keys, so on their own they would accept a REST message carrying
``member`` or ``guild_id`` (gateway-only fields). Closing every plain object schema with
``unevaluatedProperties: false`` turns "shaped as the spec" into something a test can fail on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).parent / "openapi.json"
ROOT = "urn:discord-openapi"


class SpecViolation(AssertionError):
    """A reply the spec does not allow."""


def _absolute(node: Any) -> Any:
    """Rewrite ``#/components/...`` refs to the document's URN so any sub-schema validates on its own."""
    if isinstance(node, dict):
        return {k: (ROOT + v if k == "$ref" and v.startswith("#") else _absolute(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute(v) for v in node]
    return node


def _close(schemas: dict[str, dict]) -> None:
    """Forbid unknown keys on plain object schemas, except those used as ``allOf`` parts (they see only a
    slice of the object)."""
    parts = {ref.rsplit("/", 1)[-1] for s in schemas.values() for part in _all_of(s) if (ref := part.get("$ref"))}
    for name, schema in schemas.items():
        composed = any(k in schema for k in ("allOf", "oneOf", "anyOf"))
        if "properties" in schema and not composed and name not in parts:
            schema["unevaluatedProperties"] = False


def _all_of(node: Any) -> list[dict]:
    if isinstance(node, dict):
        found = [p for p in node.get("allOf", []) if isinstance(p, dict)]
        return found + [p for v in node.values() for p in _all_of(v)]
    if isinstance(node, list):
        return [p for v in node for p in _all_of(v)]
    return []


@cache
def _spec() -> tuple[dict, Registry, list[tuple[re.Pattern, str]]]:
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    _close(spec["components"]["schemas"])
    spec = _absolute(spec)
    registry = Registry().with_resource(ROOT, Resource.from_contents(spec, default_specification=DRAFT202012))
    # literal segments (``@original``) before parameters, so the more specific template wins
    templates = sorted(spec["paths"], key=lambda p: (p.count("{"), -len(p)))
    routes = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"), p) for p in templates]
    return spec, registry, routes


def response_schema(method: str, path: str, status: int) -> dict | None:
    """The schema Discord documents for this reply; None for a body-less reply. Raises for an undocumented one."""
    spec, _, routes = _spec()
    template = next((t for pattern, t in routes if pattern.match(path)), None)
    operation = spec["paths"].get(template or "", {}).get(method.lower())
    if operation is None:
        raise SpecViolation(f"{method} {path}: not a route in the vendored spec (add it to tests/discord_spec/cut.py)")
    responses = operation["responses"]
    response = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX")
    if response is None:
        raise SpecViolation(f"{method} {path} -> {status}: the spec documents only {sorted(responses)}")
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    content = response.get("content", {}).get("application/json")
    return None if content is None else content["schema"]


def check(method: str, path: str, status: int, content_type: str | None, body: bytes) -> None:
    """Raise SpecViolation unless this reply matches what Discord documents for the route and status."""
    schema = response_schema(method, path, status)
    where = f"{method} {path} -> {status}"
    if schema is None:
        if body:
            raise SpecViolation(f"{where}: the spec documents no body, got {body[:200]!r}")
        return
    if content_type != "application/json":
        raise SpecViolation(f"{where}: Content-Type {content_type!r}, the spec documents application/json")
    errors = sorted(Draft202012Validator(schema, registry=_spec()[1]).iter_errors(json.loads(body)),
                    key=lambda e: list(e.absolute_path))
    if errors:
        worst = errors[0]
        detail = worst.message if not worst.context else "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in worst.context[:6])
        raise SpecViolation(f"{where}: at /{'/'.join(map(str, worst.absolute_path))}: {detail[:1500]}")


@dataclass
class SpecCheck:
    """Collects every reply a fake Discord sends and checks each against the spec.

    Off-spec replies the fake sends on purpose (a Cloudflare-style HTML 429) are skipped by content type.
    """

    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def __call__(self, method: str, path: str, status: int, content_type: str | None, body: bytes) -> None:
        if content_type not in (None, "application/json"):
            return
        self.checked += 1
        try:
            check(method, path.removeprefix("/api/v10"), status, content_type, body)
        except SpecViolation as exc:
            self.violations.append(str(exc))

    def assert_clean(self) -> None:
        if self.violations:
            unique = list(dict.fromkeys(self.violations))
            raise SpecViolation(f"{len(unique)} kinds of off-spec replies from the fake:\n" + "\n".join(unique[:10]))
