"""`discl gc [--dry-run]`: drop spectrum-store keys that no experiment under the run root uses.

The store of the config's dataset (``<run_root>/_spectra/<dataset>/``) keeps every image and CLIP score any
experiment ever generated. An experiment uses the keys of its ``generate/manifest.parquet`` (and the score
keys of its ``score/score_keys.parquet``). Image parts none of whose keys any experiment uses are deleted;
score rows whose image is gone and that no experiment uses are dropped. Delete an experiment's folder first
to release its keys. Holds the store's writer lock: it never races a running ``discl generate``.

The canonical dataset rows in the same store (``_spectra/<dataset>/rows/<key>/``) go the same way: a key no
experiment's ``dataset/`` uses (the key its ``_dataset_rows.json`` names, or for older ones the spec of its
``_dataset_config.json``) is deleted, under the rows store's own writer lock. Experiments' ``dataset/``
folders are links or copies, so nothing an experiment reads is lost; a later experiment on a dropped spec
rebuilds its rows with the loader.
"""

from __future__ import annotations

import argparse
import json

from discl_ray.cli.stage import run_stage


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="only count what would be dropped")


def _body(ctx, args: argparse.Namespace) -> int:
    from discl_ray.data import gc_rows
    from discl_ray.generation.store import gc_store, rows_root, store_root

    report = gc_store(ctx.paths.root, store_root(ctx.cfg, ctx.paths), dry_run=args.dry_run)
    rows = gc_rows(ctx.paths.root, rows_root(ctx.cfg, ctx.paths), ctx.cfg.dataset.name, dry_run=args.dry_run)
    verb = "would drop" if args.dry_run else "dropped"
    print(f"gc: {verb} {report['images_dropped']} images ({report['image_parts_dropped']} parts) and "
          f"{report['scores_dropped']} scores; kept {report['images_kept']} images used by "
          f"{len(report['experiments'])} experiments")
    print(f"gc: {verb} {rows['row_keys_dropped']} dataset row keys ({rows['rows_dropped']} rows); kept "
          f"{rows['row_keys_kept']} used by {len(rows['row_experiments'])} experiments")
    report.update({k: v for k, v in rows.items() if k != "dry_run"})
    print(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "gc", __doc__, _body, _args)
