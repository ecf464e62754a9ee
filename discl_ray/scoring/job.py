"""``discl score`` end to end: spectrum + real sources + prompts → scores, filtered spectrum, summary, plots.

One Ray Data pass: spectrum part files → :class:`~discl_ray.scoring.embed.SpectrumScorer` actors
(``scoring.actors_*``, ``num_gpus_per_actor``). The real source rows the spectrum needs are read on the
driver (``read_rows(cfg, splits=("train",))``) and ``ray.put`` once; each actor embeds every class prompt
once and each source the first time it sees it (see :mod:`discl_ray.scoring.embed`), then encodes only
the synthetic images.

Resumable like generation: scores are written in atomic parquet parts every ``scoring.write_every`` rows;
a rerun skips image_ids already in ``scores/`` or ``errors/`` (with ``scoring.retry_errors`` it retries
the latter, replacing their old error rows, never duplicating them). A change of CLIP model starts the scores over. The filtered
spectrum, summary and histograms are rebuilt from all scores on every run, so a new threshold costs no
CLIP work.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from discl_ray.io import parquet_files, read_parquet_dir, replace_parquet_dir, write_parquet_part
from discl_ray.runtime import RunPaths
from discl_ray.scoring.clip import clip_model_id, resolve_clip_source
from discl_ray.scoring.embed import SCORE_COLUMNS, SOURCE_COLUMNS, SPECTRUM_INPUT_COLUMNS, SpectrumScorer
from discl_ray.scoring.report import filter_scores, plot_histograms, summarize

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, ScoringConfig

log = logging.getLogger(__name__)
ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])
_MARKER = "_score_model.json"


class ScoreInputError(ValueError):
    """A missing or inconsistent input of the scoring stage (message says which and what to run)."""


@dataclass
class ScoreResult:
    """What one ``discl score`` run did and where its outputs are."""

    scored: int
    skipped: int
    errors: int
    total: int
    kept: int
    out_dir: Path
    histograms: list[Path] = field(default_factory=list)

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.json"


def _read_optional(directory: Path, columns: Optional[list[str]] = None) -> Optional[pa.Table]:
    return read_parquet_dir(directory, columns) if parquet_files(directory) else None


def _check_model(out: Path, clip_model: str) -> None:
    """Scores made by another CLIP model are not resumable: start over (and say so)."""
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("clip_model") != clip_model:
        log.warning("scoring model changed to %s: discarding earlier scores and errors", clip_model)
        for sub in ("scores", "errors"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"clip_model": clip_model}))


def read_label_prompts(paths: RunPaths, labels: set[int]) -> dict[int, str]:
    """label → clip_prompt from the prompts table, checked to cover every spectrum label."""
    try:
        table = read_parquet_dir(paths.stage("prompts"), ["label", "clip_prompt"])
    except FileNotFoundError:
        raise ScoreInputError(f"no prompts table in {paths.stage('prompts')}; run `discl prompts` first") from None
    prompts = {int(lbl): p for lbl, p in zip(table["label"].to_pylist(), table["clip_prompt"].to_pylist())}
    missing = sorted(labels - set(prompts))
    if missing:
        raise ScoreInputError(f"prompts table {paths.stage('prompts')} has no clip_prompt for labels {missing}")
    return {lbl: prompts[lbl] for lbl in sorted(labels)}


class _PartWriter:
    """Buffers scored rows and error rows; writes atomic parquet parts every ``every`` rows."""

    def __init__(self, scores_dir: Path, errors_dir: Path, every: int):
        self.scores_dir, self.errors_dir, self.every = scores_dir, errors_dir, every
        self.ok: list[pa.Table] = []
        self.bad: list[pa.Table] = []
        self.n_ok = self.n_bad = self.pending = 0
        self.bad_sources: set[str] = set()

    def add_errors(self, table: pa.Table) -> None:
        if table.num_rows:
            self.bad.append(table.cast(ERROR_SCHEMA))
            self.n_bad += table.num_rows

    def add(self, batch: pa.Table) -> None:
        bad_src = batch.filter(batch["source_error"].is_valid())
        for sid, reason in zip(bad_src["source_image_id"].to_pylist(), bad_src["source_error"].to_pylist()):
            if sid not in self.bad_sources:  # many rows (and maybe several actors) report the same source
                self.bad_sources.add(sid)
                self.add_errors(pa.table({"image_id": [sid], "reason": [f"source image: {reason}"]}))
        failed = batch["error"].is_valid()
        self.add_errors(batch.filter(failed).select(["image_id", "error"]).rename_columns(["image_id", "reason"]))
        good = batch.filter(pc.invert(failed)).select(SCORE_COLUMNS)
        self.ok.append(good)
        self.n_ok += good.num_rows
        self.pending += batch.num_rows
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        # Errors first: a crash between the two writes leaves an id in errors/ only, which is retried.
        if self.bad:
            write_parquet_part(pa.concat_tables(self.bad), self.errors_dir, prefix="errors")
        good = pa.concat_tables(self.ok) if self.ok else None
        if good is not None and good.num_rows:
            write_parquet_part(good, self.scores_dir, prefix="scores")
        self.ok, self.bad, self.pending = [], [], 0


def _source_rows(cfg: "ExperimentConfig", sources: list[str], writer: _PartWriter) -> pa.Table:
    """The needed real source rows; sources absent from the train split become error rows."""
    from discl_ray.data import read_rows

    rows = read_rows(cfg, splits=("train",)).select(SOURCE_COLUMNS)
    rows = rows.filter(pc.is_in(rows["image_id"], pa.array(sources, pa.string())))
    ids = rows["image_id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise ScoreInputError("the train split holds duplicate image_ids; sources cannot be matched")
    missing = sorted(set(sources) - set(ids))
    if missing:
        log.warning("%d source images are not in the train split; their rows get no image–image score",
                    len(missing))
        writer.add_errors(pa.table({"image_id": missing,
                                    "reason": [f"source image not in the train split of {cfg.dataset.name}"]
                                    * len(missing)}))
    return rows.combine_chunks()


def _pool_args(scoring: "ScoringConfig") -> dict:
    import ray

    return dict(compute=ray.data.ActorPoolStrategy(min_size=scoring.actors_min, max_size=scoring.actors_max),
                num_gpus=scoring.num_gpus_per_actor, num_cpus=scoring.num_cpus_per_actor,
                batch_size=scoring.batch_size, batch_format="pyarrow")


def _read_todo(done: pa.Array):
    """A map_batches function: spectrum file paths → their rows (scoring columns) not yet in ``done``."""
    def read(batch: pa.Table) -> pa.Table:
        parts = [pq.read_table(path, columns=SPECTRUM_INPUT_COLUMNS) for path in batch["path"].to_pylist()]
        table = pa.concat_tables(parts)
        return table.filter(pc.invert(pc.is_in(table["image_id"], value_set=done))) if len(done) else table
    return read


def ray_score_files(scoring: "ScoringConfig", cache_dir: Path, files: list[Path], sources: pa.Table,
                    label_prompts: dict[int, str], clip_model: str, done: Optional[pa.Array] = None,
                    root: Optional[str] = None):
    """A Ray Data dataset of score rows (``SCORE_COLUMNS`` + ``error``, ``source_error``) for spectrum files.

    One read per spectrum part file (plain pyarrow, rows not in ``done``, fused into the scorer actor);
    the real source rows go to the object store once and each actor fetches them once.
    """
    import ray

    done = done if done is not None else pa.array([], pa.string())
    sources_ref = ray.put(sources)
    # One block per file, so files spread over actors and results stream back file by file.
    ds = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files)).map_batches(
        _read_todo(done), batch_size=1, batch_format="pyarrow")
    return ds.map_batches(SpectrumScorer, fn_constructor_kwargs=dict(
        scoring_cfg=scoring, cache_dir=str(cache_dir), sources=[sources_ref], label_prompts=label_prompts,
        clip_model=clip_model, root=root), **_pool_args(scoring))


def _score_todo(cfg: "ExperimentConfig", paths: RunPaths, files: list[Path], todo: pa.Table, done: pa.Array,
                label_prompts: dict[int, str], clip_model: str, writer: _PartWriter) -> None:
    from discl_ray.runtime import init_ray

    sources = _source_rows(cfg, sorted(set(todo["source_image_id"].to_pylist())), writer)
    labels = sorted(set(todo["label"].to_pylist()))
    init_ray(cfg)
    t0 = time.perf_counter()
    ds = ray_score_files(cfg.scoring, paths.cache, files, sources, {lbl: label_prompts[lbl] for lbl in labels},
                         clip_model, done, cfg.dataset.root)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=cfg.scoring.write_every):
        writer.add(batch)
    writer.flush()
    log.info("scored %d rows from %d sources (%d error rows) in %.1f s", writer.n_ok, sources.num_rows,
             writer.n_bad, time.perf_counter() - t0)


def write_filtered(files: list[Path], kept: pa.Table, out_dir: Path) -> int:
    """Spectrum rows (all columns) joined with their scores, for kept ids; replaces ``out_dir`` whole."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = kept.select(["image_id", "clip_text_cos", "clip_image_cos", "clip_score"])
    n, empty = 0, None
    for f in files:
        part = pq.read_table(f)
        part = part.filter(pc.is_in(part["image_id"], extra["image_id"]))
        joined = part.join(extra, "image_id", join_type="inner")
        if joined.num_rows:
            write_parquet_part(joined, tmp, prefix="filtered")
            n += joined.num_rows
        elif empty is None:
            empty = joined
    if n == 0 and empty is not None:
        write_parquet_part(empty, tmp, prefix="filtered")  # an empty table, so readers see 0 rows, not no table
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return n


def run_score(cfg: "ExperimentConfig") -> ScoreResult:
    """Score, filter and summarise the experiment's spectrum (see the module docstring)."""
    paths = RunPaths.from_config(cfg)
    spectrum_dir = paths.stage("generate", "spectrum")
    files = parquet_files(spectrum_dir)
    if not files:
        raise ScoreInputError(f"no spectrum parquet in {spectrum_dir}; run `discl generate` first")
    try:
        resolve_clip_source(cfg.scoring, paths.cache)
    except FileNotFoundError as err:
        raise ScoreInputError(str(err)) from None
    out = paths.stage("score")
    scores_dir, errors_dir = out / "scores", out / "errors"
    clip_model = clip_model_id(cfg.scoring, paths.cache)
    _check_model(out, clip_model)

    keys = read_parquet_dir(spectrum_dir, ["image_id", "source_image_id", "label", "class_name"])
    label_prompts = read_label_prompts(paths, set(keys["label"].to_pylist()))
    scored = _read_optional(scores_dir, ["image_id"])
    old_errors = _read_optional(errors_dir)
    done = [scored["image_id"]] if scored is not None else []
    if old_errors is not None and not cfg.scoring.retry_errors:
        done.append(old_errors["image_id"])
    done = pc.unique(pa.chunked_array(done, pa.string())) if done else pa.array([], pa.string())
    todo = keys.filter(pc.invert(pc.is_in(keys["image_id"], value_set=done)))
    writer = _PartWriter(scores_dir, errors_dir, cfg.scoring.write_every)
    if todo.num_rows:
        if old_errors is not None:  # these ids are retried now: drop their old rows
            retry = pa.concat_arrays([todo["image_id"].combine_chunks(),
                                      pc.unique(todo["source_image_id"])])
            replace_parquet_dir(old_errors.filter(pc.invert(pc.is_in(old_errors["image_id"], value_set=retry))),
                                errors_dir, prefix="errors")
        _score_todo(cfg, paths, files, todo, done, label_prompts, clip_model, writer)
    return finalize(cfg, paths, keys, clip_model, scored=writer.n_ok, skipped=keys.num_rows - todo.num_rows,
                    errors=writer.n_bad, files=files)


def finalize(cfg: "ExperimentConfig", paths: RunPaths, keys: pa.Table, clip_model: str, scored: int,
             skipped: int, errors: int, files: list[Path]) -> ScoreResult:
    """Filtered spectrum, summary.json and histograms from all scores; logged to MLflow when enabled."""
    out = paths.stage("score")
    scores = _read_optional(out / "scores", SCORE_COLUMNS)
    if scores is None:
        scores = pa.table({c: pa.array([], t) for c, t in zip(SCORE_COLUMNS, [
            pa.string(), pa.string(), pa.int64(), pa.float64(), pa.int64(), pa.float64(), pa.float64(),
            pa.float64(), pa.string()])})
    scores = scores.filter(pc.is_in(scores["image_id"], value_set=keys["image_id"].combine_chunks()))
    all_errors = _read_optional(out / "errors")
    threshold = cfg.scoring.threshold
    kept = filter_scores(scores, threshold)
    write_filtered(files, kept, out / "filtered")
    names = dict(zip(keys["label"].to_pylist(), keys["class_name"].to_pylist()))
    summary = summarize(scores, threshold, clip_model, names, all_errors.num_rows if all_errors else 0)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    hists = plot_histograms(scores, out, threshold, bins=cfg.scoring.histogram_bins)
    result = ScoreResult(scored=scored, skipped=skipped, errors=errors, total=scores.num_rows,
                         kept=kept.num_rows, out_dir=out, histograms=hists)
    if cfg.tracking.enabled:
        _log_mlflow(cfg, summary, [result.summary_path, *hists])
    return result


def _log_mlflow(cfg: "ExperimentConfig", summary: dict, artifacts: list[Path]) -> None:
    import mlflow

    from discl_ray import tracking

    metrics = {"total": summary["total"], "kept": summary["kept"], "errors": summary["errors"]}
    if summary["kept_frac"] is not None:
        metrics["kept_frac"] = summary["kept_frac"]
    for lam, group in summary["per_lam"].items():
        metrics[f"kept_frac_lam_{lam}"] = group["kept_frac"]
        if group["clip_text_cos"]["mean"] is not None:
            metrics[f"clip_text_cos_mean_lam_{lam}"] = group["clip_text_cos"]["mean"]
    with tracking.run(cfg, "score", run_name=f"score-{cfg.experiment}", tags={"clip_model": summary["clip_model"]}):
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="score")
