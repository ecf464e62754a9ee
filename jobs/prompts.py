"""`discl prompts`: write the per-class prompt table runs/<experiment>/prompts/."""

from __future__ import annotations

from discl_ray.cli_common import preflight, run_stage
from discl_ray.config import ExperimentConfig


def _body(cfg: ExperimentConfig, args) -> int:
    from discl_ray import data
    from discl_ray.io import replace_parquet_dir
    from discl_ray.prompts import build_prompts
    from discl_ray.runtime import RunPaths

    preflight(cfg, "prompts")  # the dataset's rows can be built (a missing root fails here)
    table = build_prompts(data.class_names(data.read_rows(cfg)), cfg.prompts)
    out = RunPaths.from_config(cfg).stage("prompts")
    replace_parquet_dir(table, out, prefix="prompts")
    first = table.slice(0, 1).to_pylist()[0]
    print(f"prompts for {table.num_rows} classes -> {out}")
    print(f"e.g. {first['class_name']!r}: clip={first['clip_prompt']!r} gen={first['gen_prompts'][:2]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "prompts", __doc__, _body)
