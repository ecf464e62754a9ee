"""Strict config machinery shared by every stage schema.

Every schema derives from :class:`StrictModel`: unknown keys are rejected (with the valid keys named),
values are type-checked, and cross-field checks run at construction. Validation errors are re-raised as
:class:`ConfigError` whose message names the dotted field path and, for choices, the valid values.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from discl_ray.errors import UserError


class ConfigError(UserError):
    """An invalid configuration: the message names the field path and what is allowed."""


class StrictModel(BaseModel):
    """Base for every config section: no unknown keys, validated assignment, doc per field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False,
                              protected_namespaces=())


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the (nested) model that owns ``loc[:-1]``."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        cur = ann if isinstance(ann, type) else None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: ``field.path: what is wrong (got X)``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Drop pydantic's union/literal tags (e.g. 'literal['a']') from the path.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "float"))))
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc)
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key; valid keys: {', '.join(sorted(valid))}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("missing", "value_error"):
                got = e["input"]
                if not isinstance(got, (dict, list)) or len(repr(got)) < 80:
                    msg += f" (got {got!r})"
        lines.append(f"{path}: {msg}")
    # De-duplicate (unions report the same path once per branch).
    seen, out = set(), []
    for line in lines:
        if line not in seen:
            seen.add(line)
            out.append(line)
    return "invalid config:\n  " + "\n  ".join(out)


def validate(model: type[BaseModel], data: dict, prefix: str = ""):
    """Build ``model`` from ``data`` or raise :class:`ConfigError` with readable messages."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, prefix)) from None
