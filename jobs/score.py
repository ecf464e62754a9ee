"""`discl score`: CLIP-score the spectrum, filter it at ``scoring.threshold``, summarise per λ and class.

Reads ``runs/<exp>/generate/spectrum/``, the train split's real images and ``runs/<exp>/prompts/``;
writes ``runs/<exp>/score/{scores,errors,kept}/``, ``summary.json`` and ``hist_*.png``. Rerunning
resumes (scored ids are skipped) and re-applies the threshold without new CLIP work.
"""

from __future__ import annotations

from discl_ray.cli.stage import preflight, run_stage


def _body(ctx, args) -> int:
    from discl_ray.scoring.job import run_score

    cfg = ctx.cfg
    preflight(ctx)  # missing inputs, models, an unreachable MLflow: before any cluster work
    res = run_score(ctx)  # ScoreInputError, a busy stage: UserErrors, one line and exit 2
    print(f"scored {res.scored} rows ({res.skipped} already scored, {res.reused} of them reused from the "
          f"spectrum store; {res.errors} errors); "
          f"kept {res.kept}/{res.total} at clip_text_cos >= {cfg.scoring.threshold}")
    print(f"outputs: {res.out_dir} (scores/, kept/, errors/, summary.json, "
          f"{', '.join(p.name for p in res.histograms)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "score", __doc__.splitlines()[0].removeprefix("`discl score`: "), _body)
