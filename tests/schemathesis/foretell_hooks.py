"""A schemathesis check of the one leeway the schema takes (loaded with SCHEMATHESIS_HOOKS).

positive_data_acceptance is configured to let a schema-valid body be answered 400 (see
schemathesis.toml) because some rules span fields and JSON Schema cannot state them. This check
takes that leeway back everywhere else: such a 400 must name, in ``error.param``, a field whose
schema is marked ``x-cross-field`` (and whose description states the rule).
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from schemathesis import CheckContext, Response


def _cross_fields(case: Any) -> set[str]:
    raw = case.operation.schema.raw_schema
    body = case.operation.definition.raw.get("requestBody", {})
    ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    component = raw["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    return {k for k, v in component.get("properties", {}).items() if v.get("x-cross-field")}


@schemathesis.check
def refused_valid_data_names_a_cross_field(
    ctx: CheckContext, response: Response, case: Any
) -> bool | None:
    """A schema-valid body refused with 400 must be refused for a documented cross-field rule."""
    meta = case.meta
    if response.status_code != 400 or meta is None or not meta.generation.mode.is_positive:
        return None
    if case.body is None or not isinstance(case.body, dict):
        return None
    try:
        param = response.json()["error"]["param"]
    except (ValueError, KeyError, TypeError):
        param = None
    field = re.split(r"[.\[]", param)[0] if isinstance(param, str) else None
    allowed = _cross_fields(case)
    if field not in allowed:
        raise AssertionError(
            f"Schema-valid body refused with 400 naming {param!r}: only fields marked "
            f"x-cross-field ({', '.join(sorted(allowed))}) may refuse schema-valid values"
        )
    return None
