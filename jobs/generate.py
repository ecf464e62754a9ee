"""`discl generate`: the synthetic-to-real spectrum (hard images × λ × seeds) on Ray Data.

Reads ``<exp>/mine/`` and ``<exp>/prompts/``; generates only the keys the dataset's spectrum store
(``<run_root>/_spectra/<dataset>/``) lacks; writes ``<exp>/generate/manifest.parquet`` and the view
``<exp>/generate/spectrum/`` (+ ``errors/``, ``summary.json``, ``spectrum_grid.png``). Rerunning resumes.
"""

from __future__ import annotations

import json

from discl_ray.cli.stage import preflight, run_stage


def _body(ctx, args) -> int:
    from discl_ray.generation.job import run_generate

    preflight(ctx)  # missing inputs, models, an unreachable MLflow: before any cluster work
    summary = run_generate(ctx)  # a UserError (e.g. GPUs vs the cluster, a busy stage): one line, exit 2
    print(f"generate: generated {summary['generated']}, skipped {summary['skipped']} (already written), "
          f"failed {summary['failed']} of {summary['planned']} keys in {summary['wall_s']:.1f} s "
          f"({summary['outputs_per_s']:.2f} outputs/s)")
    print(f"spectrum store: generated {summary['generated']}, reused {summary['reused']} "
          f"(digest {summary['store_digest']})")
    print(json.dumps({k: summary[k] for k in ("store", "spectrum_dir", "errors_dir", "grid")}, indent=1))
    nodes = sorted({(a["node_id"][:12], a["device"], a["resources"].get("GPU", 0)) for a in summary["actors"]})
    print("actors (node, device, GPUs): " + ", ".join(f"{n} {d} {g:g}" for n, d, g in nodes))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "generate", __doc__, _body)
