"""`discl world`: train the toy world (generator, CLIP, judge classifier) on the digits world split.

    discl world [--config FILE] [key=value ...] [--variant clean|gap] [--budget-s N] [--force] [--no-gates]

Uses ``dataset.toy.world_seed`` (None: ``dataset.seed``), ``dataset.image_size`` and ``dataset.toy.world_fraction``; caches under
``RunPaths.cache/toyworld`` (the gap variant under ``RunPaths.cache/toyworld-gap``, built on top of the clean
world). Which variants: ``--variant``, else those whose models the config names (``generation.model: toy-gap``,
``scoring.model: toy-gap-clip``, ``mining.classifier: toy-gap`` → gap), else clean. Without ``--force``, the models shipped with the package
(``discl_ray/assets/toyworld``) are unpacked instead of trained when they match the settings, and the gates
run on them. Exit status: 0 when every quality gate passes (or the cache that passed is
reused), 1 when a gate fails (artifacts are still written, the manifest says which gate failed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from discl_ray.cli.stage import run_stage
from discl_ray.config import ExperimentConfig
from discl_ray.errors import UserError
from discl_ray.runtime.context import StageContext


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default=None, metavar="clean|gap",
                   help="which toy world: clean (the default) or gap (task digits in a camera look the generator's "
                        "prior never drew; built on the clean world). Default: the variants the config's toy model "
                        "names select")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget in seconds on 2 idle cores: 360 (default) = the full plan; less = "
                        "proportionally fewer steps (smoke runs)")
    p.add_argument("--max-wall-s", type=float, default=None,
                   help="also stop each model early once its share of this wall-clock time is spent")
    p.add_argument("--force", action="store_true",
                   help="retrain even when a matching cache or the shipped weights exist")
    p.add_argument("--no-gates", action="store_true", help="skip the quality gates (exit 0 if training ran)")
    p.add_argument("--ship", action="store_true",
                   help="after a run that passed every gate, write the compact copy shipped with the package "
                        "(discl_ray/assets/toyworld: float16, captions' token rows only)")
    p.add_argument("--train-text", action="store_true",
                   help="fine-tune the generator's text encoder (the toy CLIP's text tower) with the UNet "
                        "(default: frozen, as in Stable Diffusion)")


def _source(man: dict) -> str:
    made = "shipped weights" if man.get("source") == "shipped" else "trained"
    return f"reused cache of {made}" if man.get("reused") else made


def format_report(man: dict, verbose: bool = False) -> str:
    """Human summary of a manifest: timings, sizes and every gate with PASS/FAIL (the CLIP score
    distributions only when ``verbose``)."""
    t = man["timing"]
    lines = [f"toy world ({_source(man)}); budget {man['budget_s']:.0f} s"]
    if man.get("source") == "shipped" and not man.get("reused"):
        lines[0] += " (`discl world --force` retrains)"
    for k in ("classifier", "clip", "vae", "unet", "train_total", "install", "gates", "total"):
        if k in t:
            steps = f", {t[k]['steps']}/{t[k]['planned']} steps" if "steps" in t[k] else ""
            lines.append(f"  {k:<12} {t[k]['seconds']:7.1f} s wall {t[k]['cpu_seconds']:7.1f} s CPU{steps}")
    lines.append("  size MB: " + ", ".join(f"{k} {v:.2f}" for k, v in man["size_mb"].items() if v is not None))
    g = man.get("gates") or {}
    if "classifier" in g:
        lines.append(f"  judge classifier held-out accuracy {g['classifier']['heldout_acc']:.3f}")
    if "clip" in g:
        c = g["clip"]
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] CLIP zero-shot {c['zero_shot_acc']:.3f} "
                     f"(≥ {c['min_acc']:.2f})")
    if "generator" in g:
        c = g["generator"]
        by = ", ".join(f"λ={k}: {v:.2f}" for k, v in c["acc_by_lam"].items())
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] generator λ=0 recognised {c['lam0_acc']:.3f} "
                     f"(≥ {c['min_lam0_acc']:.2f}), agreement rises with λ: {c['agreement_rises']} ({by}); "
                     f"shifted-prompt λ=0 {c['lam0_shifted_prompt_acc']:.2f}; w={c['guidance']}")
    if "clip_scores" in g and verbose:
        lines.append("  toy-CLIP cosine to the prompted class (mean ± std, q10/q50):")
        for k, s in g["clip_scores"].items():
            lines.append(f"    {k:<8} {s['mean']:.3f} ± {s['std']:.3f}  q10 {s['q10']:.3f}  q50 {s['q50']:.3f}")
    return "\n".join(lines)


def _body(ctx: StageContext, args: argparse.Namespace) -> int:
    from discl_ray import toyworld

    cfg = ctx.cfg
    if args.variant is not None and args.variant not in toyworld.VARIANTS:
        print(f"discl world: --variant: unknown toy world variant {args.variant!r}; choose from: "
              f"{', '.join(toyworld.VARIANTS)}", file=sys.stderr)
        return 2
    variant = args.variant or ("gap" if "gap" in toyworld.variants_named(cfg) else "clean")
    if variant == "gap":
        return _gap_body(cfg, ctx.cache, args)
    return _clean_body(cfg, ctx.cache, args)


def _gap_body(cfg: ExperimentConfig, cache: Path, args: argparse.Namespace) -> int:
    from discl_ray.data.toy import partition_seed
    from discl_ray.toyworld import gap_world

    if args.train_text:
        print("discl world: --train-text does not apply to --variant gap (the gap world keeps the clean world's "
              "text tower, which its UNet was trained with)", file=sys.stderr)
        return 2
    man = _train(lambda: gap_world.train_gap_world(
        cache, seed=partition_seed(cfg.dataset), image_size=cfg.dataset.image_size, budget_s=args.budget_s,
        check_gates=not args.no_gates, force=args.force, world_fraction=cfg.dataset.toy.world_fraction,
        max_wall_s=args.max_wall_s))
    if man is None:
        return 2
    failed = None
    if man.get("passed") is False or (man.get("base") or {}).get("passed") is False:
        which = "gap-world" if man.get("passed") is False else "clean-world (the gap world's base)"
        failed = (f"a {which} quality gate FAILED (see above and `discl world`); artifacts were written but "
                  "should not be trusted.")

    def export() -> str:
        shipped = gap_world.export(cache, man)
        return f"shipped copy: {gap_world.ASSET_DIR} ({shipped['size_mb']:.2f} MB)"

    return _finish(man, args, format_gap_report(man, verbose=args.verbose), failed,
                   "a gap world trained here that passed its gates (use --force, no --no-gates)", export)


def format_gap_report(man: dict, verbose: bool = False) -> str:
    """Human summary of a gap world's manifest: its clean base, timings, gates and the gap per λ."""
    made = "shipped weights" if man.get("source") == "shipped" else "trained"
    lines = [f"toy world, gap variant ({'reused cache of ' + made if man.get('reused') else made}); look "
             f"{man['settings']['look']}; built on the clean world ({_source({**man.get('base', {})})}"
             + {True: ", gates PASS)", False: ", a gate FAILED)"}.get((man.get("base") or {}).get("passed"), ")")]
    for k, t in man["timing"].items():
        steps = f", {t['steps']}/{t['planned']} steps" if "steps" in t else ""
        lines.append(f"  {k:<16} {t['seconds']:7.1f} s wall {t['cpu_seconds']:7.1f} s CPU{steps}")
    g = man.get("gates") or {}
    if "judge" in g:
        c = g["judge"]
        accs = ", ".join(f"{k} {v:.3f}" for k, v in c["heldout_acc"].items())
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] judge held-out accuracy {accs} (≥ {c['min_acc']:.2f})")
    if "clip" in g:
        c = g["clip"]
        accs = ", ".join(f"{k} {v:.3f} (≥ {c['min_acc'][k]:.2f})" for k, v in c["zero_shot_acc"].items())
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] CLIP zero-shot {accs}")
    if "generator" in g:
        c = g["generator"]
        by = ", ".join(f"λ={k}: {v:.2f}" for k, v in c["acc_by_lam"].items())
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] generator λ=0 recognised {c['lam0_acc']:.3f} "
                     f"(≥ {c['min_lam0_acc']:.2f}), agreement rises with λ: {c['agreement_rises']} ({by})")
    if "gap" in g:
        c = g["gap"]
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] gap: probe at λ=0 {c['probe_lam0']:.3f} "
                     f"(≥ {c['min_probe_lam0']:.2f}), at the top λ ≤ {c['max_probe_top']:.2f}, falls with λ: "
                     f"{c['falls']}")
    if man.get("gap"):
        lines.append("  gap per λ (task digits vs generations):  λ    probe_acc  image_cos  judge_acc")
        for lam, row in man["gap"].items():
            lines.append(f"  {'':41}{lam:>4}  {row['probe_acc']:9.3f}  {row['image_cos']:9.3f}  {row['judge_acc']:9.3f}")
    return "\n".join(lines)


def _clean_body(cfg: ExperimentConfig, cache: Path, args: argparse.Namespace) -> int:
    from discl_ray.data.toy import partition_seed
    from discl_ray.toyworld.train import FULL_BUDGET_S, train_world

    man = _train(lambda: train_world(
        cache, seed=partition_seed(cfg.dataset), image_size=cfg.dataset.image_size,
        budget_s=args.budget_s or FULL_BUDGET_S, check_gates=not args.no_gates, force=args.force,
        world_fraction=cfg.dataset.toy.world_fraction, train_text=args.train_text, max_wall_s=args.max_wall_s))
    if man is None:
        return 2
    failed = ("a quality gate FAILED (see above); artifacts were written but should not be trusted."
              if man.get("passed") is False else None)

    def export() -> str:
        from discl_ray.toyworld import ship

        shipped = ship.export(cache, man)
        return (f"shipped copy: {ship.ASSET_DIR} ({shipped['size_mb']:.2f} MB, "
                f"{shipped['token_rows']['stored']} token rows stored)")

    return _finish(man, args, format_report(man, verbose=args.verbose), failed,
                   "a world trained here that passed its gates (use --force, no --no-gates)", export)


def _train(make):
    """The world's manifest, or None after printing a ValueError (bad settings) as one line."""
    try:
        return make()
    except UserError as err:
        print(f"discl world: {err}", file=sys.stderr)
        return None


def _finish(man: dict, args: argparse.Namespace, report: str, failed, ship_needs: str, export) -> int:
    """Print the report; exit 1 when a gate failed; with --ship, export a world trained here that passed."""
    print(report)
    if args.verbose:
        print(json.dumps(man, indent=2))
    if failed:
        print(f"discl world: {failed}", file=sys.stderr)
        return 1
    if args.ship:
        if man.get("passed") is not True or man.get("source") != "trained":
            print(f"discl world: --ship needs {ship_needs}", file=sys.stderr)
            return 2
        print(export())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "world", "train the toy world's generator, CLIP and judge on the digits world split",
                     _body, _args)
