"""`discl generate`: placeholder until issue 3 lands."""

from __future__ import annotations

from discl_ray.cli_common import not_yet


def main(argv: list[str] | None = None) -> int:
    return not_yet("generate", "issue 3")
