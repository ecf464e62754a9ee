"""`discl mine`: write the hard-sample table runs/<experiment>/mine/."""

from __future__ import annotations

import json
import sys
from collections import Counter

from discl_ray.cli.stage import preflight, run_stage
from discl_ray.runtime.context import StageContext


def _body(ctx: StageContext, args) -> int:
    from discl_ray import data
    from discl_ray.mining import select as mining
    from discl_ray.prompts.templates import build_prompts
    from discl_ray.runtime.io import replace_parquet_dir

    cfg = ctx.cfg
    preflight(ctx)  # missing inputs, models, an unreachable MLflow: before any cluster work
    train = data.read_rows(cfg, splits=("train",), paths=ctx.paths)
    if train.num_rows == 0:
        print(f"discl mine: dataset {cfg.dataset.name} has no train rows", file=sys.stderr)
        return 2
    if cfg.mining.mode == "frequency":
        hard = mining.mine_frequency(train, cfg.mining)
    else:
        prompts = build_prompts(data.class_names(data.read_rows(cfg, paths=ctx.paths)), cfg.prompts)
        actors: list = []
        probs = mining.true_class_probs(ctx, train, prompts, actors)
        hard = mining.mine_confidence(train, cfg.mining, probs)
    out = ctx.out()
    replace_parquet_dir(hard, out, prefix="hard")
    groups = mining.class_groups(train["label"].to_pylist(), cfg.mining.few_max, cfg.mining.many_min)
    summary = {
        "train_images": train.num_rows, "hard_images": hard.num_rows, "mode": cfg.mining.mode,
        "hard_per_class": dict(sorted(Counter(hard["label"].to_pylist()).items())),
        "class_groups": {g: sorted(c for c, v in groups.items() if v == g) for g in ("many", "medium", "few")},
    }
    if cfg.mining.mode != "frequency":
        summary["actors"] = actors
    out.join("summary.json").write_text(json.dumps(summary, indent=1))
    print(f"hard samples: {hard.num_rows} of {train.num_rows} training images ({cfg.mining.mode}) -> {out}")
    print(f"class groups: {summary['class_groups']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "mine", __doc__, _body)
