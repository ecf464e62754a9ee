"""`discl prompts`: write the per-class prompt table runs/<experiment>/prompts/.

With --llm, first ask an LLM for each class's diverse descriptions (paper A.1.2) through Ray Data LLM and use
them as prompts.prompts_file (see discl_ray/prompts/llm.py)."""

from __future__ import annotations

import argparse

from discl_ray.cli.stage import preflight, run_stage
from discl_ray.runtime.context import StageContext


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", action="store_true", help="write prompts.prompts_file from an LLM first (prompts.llm.*)")


def _body(ctx: StageContext, args) -> int:
    from discl_ray import data
    from discl_ray.prompts.templates import build_prompts
    from discl_ray.runtime.io import replace_parquet_dir

    cfg = ctx.cfg
    preflight(ctx)  # the dataset's rows can be built (a missing root fails here)
    if args.llm:
        from discl_ray.prompts.llm import llm_prompt_file

        path, info = llm_prompt_file(ctx, cfg.prompts.prompts_file)
        print(f"LLM prompts: {info['descriptions']} descriptions for {info['classes']} classes "
              f"({'from the cache' if info['cached'] else 'queried'}; {len(info['short'])} classes got fewer than "
              f"asked) -> {path}")
        cfg = cfg.model_copy(update={"prompts": cfg.prompts.model_copy(update={"prompts_file": str(path)})})

    table = build_prompts(data.class_names(data.read_rows(cfg, paths=ctx.paths)), cfg.prompts)
    out = ctx.out()
    replace_parquet_dir(table, out, prefix="prompts")
    first = table.slice(0, 1).to_pylist()[0]
    print(f"prompts for {table.num_rows} classes -> {out}")
    print(f"e.g. {first['class_name']!r}: clip={first['clip_prompt']!r} gen={first['gen_prompts'][:2]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "prompts", __doc__, _body, _args)
