"""Prompt tables: one row per class with the CLIP filter prompt and the generation prompts.

Generation prompts are the template (``a photo of {name}``) and/or a per-class list read from JSON (e.g. the
LLM-written diverse descriptions of paper A.1.2); names go through an optional scientific → common map
(``a photo of {common} in the wild`` for iWildCam).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from discl_ray.errors import MissingInput, UserError

if TYPE_CHECKING:
    from discl_ray.config import PromptsConfig

PROMPTS_SCHEMA = pa.schema([
    ("label", pa.int64()), ("class_name", pa.string()), ("display_name", pa.string()),
    ("clip_prompt", pa.string()), ("gen_prompts", pa.list_(pa.string())),
])


def resolve_asset(path: str) -> Path:
    """A config file path: as given (absolute or relative to the working dir), else relative to the repo root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    packaged = Path(__file__).resolve().parents[2] / p
    return packaged if packaged.exists() else p


def _read_json(path: str, what: str) -> dict:
    from discl_ray.runtime.storage import as_storage, is_uri

    p = as_storage(path) if is_uri(path) else resolve_asset(path)   # a local/packaged file or an s3://, gs:// URI
    if not p.is_file():
        raise MissingInput(f"prompts.{what}: file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"prompts.{what}: {p} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"prompts.{what}: {p} must hold a JSON object keyed by class name")
    return data


def display_names(class_names, cfg: "PromptsConfig") -> list[str]:
    """Each class name through ``cfg.name_map`` (scientific -> common); unmapped names stay as they are."""
    names = _read_json(cfg.name_map, "name_map") if cfg.name_map else {}
    return [str(names.get(c, c)) for c in class_names]


def build_prompts(classes: dict[int, str], cfg: "PromptsConfig") -> pa.Table:
    """The prompts table for ``classes`` (label → class_name)."""
    names = _read_json(cfg.name_map, "name_map") if cfg.name_map else {}
    lists = _read_json(cfg.prompts_file, "prompts_file") if cfg.prompts_file else {}
    rows = {k: [] for k in PROMPTS_SCHEMA.names}
    for label, cls in sorted(classes.items()):
        display = str(names.get(cls, cls))
        extra = lists.get(cls, lists.get(display, []))
        if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
            raise UserError(f"prompts.prompts_file: entry for {cls!r} must be a list of strings")
        gen = ([cfg.template.format(name=display)] if cfg.include_template else []) + [s.strip() for s in extra]
        if not gen:
            raise UserError(f"prompts: class {cls!r} has no generation prompt (not in prompts_file and "
                             "include_template=false)")
        rows["label"].append(int(label))
        rows["class_name"].append(cls)
        rows["display_name"].append(display)
        rows["clip_prompt"].append(cfg.clip_template.format(name=display))
        rows["gen_prompts"].append(list(dict.fromkeys(gen)))
    return pa.table(rows, schema=PROMPTS_SCHEMA)
