"""`discl score`: placeholder until issue 4 lands."""

from __future__ import annotations

from discl_ray.cli_common import not_yet


def main(argv: list[str] | None = None) -> int:
    return not_yet("score", "issue 4")
