"""``discl score`` end to end: spectrum + real sources + prompts → scores, kept ids, summary, plots.

One Ray Data pass: spectrum part files → :class:`~discl_ray.scoring.embed.SpectrumScorer` actors
(``scoring.actors_*``, ``num_gpus_per_actor``). The real source rows the spectrum needs are read on the
driver (``read_rows(cfg, splits=("train",))``) and ``ray.put`` once; each actor embeds every class prompt
once and each source the first time it sees it (see :mod:`discl_ray.scoring.embed`), then encodes only
the synthetic images.

Resumable like generation: a CPU stage after the scorers writes every ``scoring.write_every`` rows as one
atomic part named by a hash of its ids, on the worker (the driver only counts receipts); a rerun skips
image_ids already in ``scores/`` or ``errors/`` (with ``scoring.retry_errors`` it retries the latter,
replacing their old error rows, never duplicating them). A change of CLIP model starts the scores over.
``kept/`` (ids and cosines at or above the threshold — the spectrum is never copied), the summary and the
histograms are rebuilt from all scores on every run, so a new threshold costs no CLIP work. A lease file
stops a second concurrent run of the stage.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from discl_ray.errors import UserError
from discl_ray.models.clip import clip_model_id, resolve_clip_source
from discl_ray.runtime.cluster import RunPaths
from discl_ray.runtime.context import StageContext
from discl_ray.runtime.io import parquet_files, read_parquet_dir, replace_parquet_dir
from discl_ray.runtime.storage import local_or_storage
from discl_ray.scoring.embed import SCORE_COLUMNS, SOURCE_COLUMNS, SPECTRUM_INPUT_COLUMNS, SpectrumScorer
from discl_ray.scoring.report import filter_scores, plot_histograms, summarize

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig, ScoringConfig
    from discl_ray.runtime.storage import Storage

log = logging.getLogger(__name__)
ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])
_MARKER = "_score_model.json"


class ScoreInputError(UserError):
    """A missing or inconsistent input of the scoring stage (message says which and what to run)."""


@dataclass
class ScoreResult:
    """What one ``discl score`` run did and where its outputs are."""

    scored: int
    skipped: int
    errors: int
    total: int
    kept: int
    out_dir: "Path | Storage"
    histograms: list = field(default_factory=list)
    reused: int = 0          # of ``skipped``: scores copied from the spectrum store

    @property
    def summary_path(self) -> "Path | Storage":
        return self.out_dir / "summary.json"


def _read_optional(directory: "Storage", columns: Optional[list[str]] = None) -> Optional[pa.Table]:
    return read_parquet_dir(directory, columns) if parquet_files(directory) else None


def _check_model(out: "Storage", clip_model: str) -> None:
    """Scores made by another CLIP model are not resumable: start over (and say so)."""
    marker = out.join(_MARKER)
    if marker.is_file() and json.loads(marker.read_text()).get("clip_model") != clip_model:
        log.warning("scoring model changed to %s: discarding earlier scores and errors", clip_model)
        for sub in ("scores", "errors"):
            out.join(sub).delete()
    marker.write_text(json.dumps({"clip_model": clip_model}))


def read_label_prompts(paths: RunPaths, labels: set[int]) -> dict[int, str]:
    """label → clip_prompt from the prompts table, checked to cover every spectrum label."""
    try:
        table = read_parquet_dir(paths.store("prompts"), ["label", "clip_prompt"])
    except FileNotFoundError:
        raise ScoreInputError(f"no prompts table in {paths.store('prompts')}; run `discl prompts` first") from None
    prompts = {int(lbl): p for lbl, p in zip(table["label"].to_pylist(), table["clip_prompt"].to_pylist())}
    missing = sorted(labels - set(prompts))
    if missing:
        raise ScoreInputError(f"prompts table {paths.store('prompts')} has no clip_prompt for labels {missing}")
    return {lbl: prompts[lbl] for lbl in sorted(labels)}


def _part(keys: list[str]) -> str:
    import hashlib

    return "part-" + hashlib.blake2b("\n".join(sorted(keys)).encode(), digest_size=8).hexdigest()


def write_scored(batch: pa.Table, scores_dir: str, errors_dir: str) -> pa.Table:
    """Ray Data CPU stage: write one block of scored rows (and its error rows) from the worker.

    File names hash the block's ids, so a rewritten block replaces its file (never a duplicate). Errors are
    written first: a crash between the two writes leaves ids in errors/ only, which ``retry_errors`` redoes."""
    from discl_ray.runtime.storage import as_storage

    name = _part(batch["image_id"].to_pylist())
    bad_src = batch.filter(batch["source_error"].is_valid())
    src_err: dict[str, str] = {}
    for sid, reason in zip(bad_src["source_image_id"].to_pylist(), bad_src["source_error"].to_pylist()):
        src_err.setdefault(sid, f"source image: {reason}")  # many rows report the same source
    failed = batch["error"].is_valid()
    errors = pa.concat_tables([
        pa.table({"image_id": list(src_err), "reason": list(src_err.values())}, schema=ERROR_SCHEMA),
        batch.filter(failed).select(["image_id", "error"]).rename_columns(["image_id", "reason"]).cast(ERROR_SCHEMA)])
    good = batch.filter(pc.invert(failed)).select(SCORE_COLUMNS)
    if errors.num_rows:
        as_storage(errors_dir).join(f"{name}.parquet").write_parquet(errors)
    if good.num_rows:
        as_storage(scores_dir).join(f"{name}.parquet").write_parquet(good)
    actors = sorted({a for a in batch["actor"].to_pylist() if a}) if "actor" in batch.column_names else []
    return pa.table({"scored": [good.num_rows], "errors": [errors.num_rows], "actors": [actors]})


def _source_rows(cfg: "ExperimentConfig", sources: list[str], errors_dir: "Storage",
                 paths: Optional[RunPaths] = None) -> tuple[pa.Table, int]:
    """The needed real source rows; sources absent from the train split become error rows."""
    from discl_ray.data import read_rows

    rows = read_rows(cfg, splits=("train",), paths=paths).select(SOURCE_COLUMNS)
    rows = rows.filter(pc.is_in(rows["image_id"], pa.array(sources, pa.string())))
    ids = rows["image_id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise ScoreInputError("the train split holds duplicate image_ids; sources cannot be matched")
    missing = sorted(set(sources) - set(ids))
    if missing:
        log.warning("%d source images are not in the train split; their rows get no image–image score",
                    len(missing))
        errors_dir.join(f"{_part(missing)}.parquet").write_parquet(pa.table(
            {"image_id": missing, "reason": [f"source image not in the train split of {cfg.dataset.name}"]
             * len(missing)}, schema=ERROR_SCHEMA))
    return rows.combine_chunks(), len(missing)


def _pool_args(scoring: "ScoringConfig", num_gpus: float) -> dict:
    import ray

    size = scoring.actors_max if scoring.actors_min is None else scoring.actors_min
    return dict(compute=ray.data.ActorPoolStrategy(min_size=size, max_size=scoring.actors_max),
                num_gpus=num_gpus, num_cpus=scoring.num_cpus_per_actor,
                batch_size=scoring.batch_size, batch_format="pyarrow")


def _read_todo(done: pa.Array):
    """A map_batches function: spectrum file URIs → their rows (scoring columns) not yet in ``done``."""
    def read(batch: pa.Table) -> pa.Table:
        from discl_ray.runtime.storage import as_storage

        parts = []
        for uri in batch["path"].to_pylist():
            f = as_storage(uri)
            parts.append(pq.read_table(f.path, columns=SPECTRUM_INPUT_COLUMNS, filesystem=f.fs))
        table = pa.concat_tables(parts)
        return table.filter(pc.invert(pc.is_in(table["image_id"], value_set=done))) if len(done) else table
    return read


def ray_score_files(scoring: "ScoringConfig", cache_dir: Path, files: list, sources: pa.Table,
                    label_prompts: dict[int, str], clip_model: str, done: Optional[pa.Array] = None,
                    root: Optional[str] = None, num_gpus: float = 0.0):
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
        clip_model=clip_model, root=root), **_pool_args(scoring, num_gpus))


def _score_todo(ctx: StageContext, files: list, todo: pa.Table, done: pa.Array,
                label_prompts: dict[int, str], clip_model: str) -> tuple[int, int, list]:
    """Score the ``todo`` rows on Ray Data; workers write the parts. Returns (scored, errors, actors)."""
    from discl_ray.generation.output import merge_actors
    from discl_ray.runtime.cluster import actor_gpus

    cfg, paths = ctx.cfg, ctx.paths
    out = paths.store("score")
    sources, n_missing = _source_rows(cfg, sorted(set(todo["source_image_id"].to_pylist())), out.join("errors"),
                                      paths)
    labels = sorted(set(todo["label"].to_pylist()))
    ctx.init_ray()
    t0 = time.perf_counter()
    sc = cfg.scoring
    ds = ray_score_files(sc, paths.cache, files, sources, {lbl: label_prompts[lbl] for lbl in labels},
                         clip_model, done, cfg.dataset.root,
                         num_gpus=actor_gpus(cfg, sc.device, sc.num_gpus_per_actor, "scoring", address=ctx.address))
    ds = ds.map_batches(write_scored, batch_size=sc.write_every, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs=dict(scores_dir=str(out.join("scores")), errors_dir=str(out.join("errors"))))
    scored, errors, actors = 0, n_missing, []
    for receipt in ds.iter_rows():
        scored += receipt["scored"]
        errors += receipt["errors"]
        actors.append(receipt["actors"])
    log.info("scored %d rows from %d sources (%d error rows) in %.1f s", scored, sources.num_rows, errors,
             time.perf_counter() - t0)
    return scored, errors, merge_actors(actors)


def run_score(ctx: "StageContext | ExperimentConfig") -> ScoreResult:
    """Score, filter and summarise the experiment's spectrum (see the module docstring). ``ctx``: the stage's
    context (a bare config opens one)."""
    from discl_ray.runtime.lease import StageLease

    ctx = StageContext.of(ctx, "score")
    cfg, paths = ctx.cfg, ctx.paths
    if cfg.tracking.enabled:
        ctx.tracking_uri  # noqa: B018 — a cluster needs an http(s) store: say so before any work
    spectrum_dir = paths.store("generate", "spectrum")
    files = spectrum_dir.parquet_files()
    if not files:
        raise ScoreInputError(f"no spectrum parquet in {spectrum_dir}; run `discl generate` first")
    try:
        resolve_clip_source(cfg.scoring, paths.cache)
    except FileNotFoundError as err:
        raise ScoreInputError(str(err)) from None
    out = paths.store("score")
    scores_dir, errors_dir = out.join("scores"), out.join("errors")
    clip_model = clip_model_id(cfg.scoring, paths.cache)
    keys = read_parquet_dir(spectrum_dir, ["image_id", "source_image_id", "label", "class_name", "lam", "seed"])
    label_prompts = read_label_prompts(paths, set(keys["label"].to_pylist()))
    keyed = _score_keys(cfg, paths, keys, label_prompts)
    with StageLease(out, "score"), _store_lock(cfg, keyed):
        _check_model(out, clip_model)
        scored = _read_optional(scores_dir, ["image_id"])
        old_errors = _read_optional(errors_dir)
        done = [scored["image_id"]] if scored is not None else []
        if old_errors is not None and not cfg.scoring.retry_errors:
            done.append(old_errors["image_id"])
        done = pc.unique(pa.chunked_array(done, pa.string())) if done else pa.array([], pa.string())
        todo = keys.filter(pc.invert(pc.is_in(keys["image_id"], value_set=done)))
        n_ok = n_bad = reused = 0
        actors: list = []
        if todo.num_rows and keyed is not None:  # scores of the same content the store already holds
            reused = _reuse_from_store(cfg, out, todo, keyed, clip_model)
            if reused:
                scored = _read_optional(scores_dir, ["image_id"])
                done = pc.unique(pa.chunked_array([done, scored["image_id"].combine_chunks()], pa.string()))
                todo = keys.filter(pc.invert(pc.is_in(keys["image_id"], value_set=done)))
        if todo.num_rows:
            if old_errors is not None:  # these ids are retried now: drop their old rows
                retry = pa.concat_arrays([todo["image_id"].combine_chunks(),
                                          pc.unique(todo["source_image_id"])])
                replace_parquet_dir(old_errors.filter(pc.invert(pc.is_in(old_errors["image_id"], value_set=retry))),
                                    errors_dir, prefix="errors")
            n_ok, n_bad, actors = _score_todo(ctx, files, todo, done, label_prompts, clip_model)
            if keyed is not None and n_ok:
                _publish_to_store(cfg, out, todo, keyed)
        log.info("score: scored %d, reused %d from the spectrum store", n_ok, reused)
        return finalize(ctx, keys, clip_model, scored=n_ok, skipped=keys.num_rows - todo.num_rows,
                        errors=n_bad, actors=actors, reused=reused, store=keyed)


# -- the spectrum store's scores (see discl_ray.generation.store) -----------------------------------------------
def _score_keys(cfg: "ExperimentConfig", paths: RunPaths, keys: pa.Table,
                label_prompts: dict[int, str]) -> Optional[dict]:
    """image_id → score key (CLIP identity, image content key, filter prompt), written to
    ``score/score_keys.parquet``; None when the spectrum has no store manifest (then nothing is shared)."""
    from discl_ray.generation.store import clip_identity, read_manifest, score_key

    try:
        meta, manifest = read_manifest(paths.store("generate"))
    except FileNotFoundError:
        return None
    image_keys = dict(zip(manifest["image_id"].to_pylist(), manifest["key"].to_pylist()))
    clip_id = clip_identity(cfg.scoring, paths.cache)
    ids, iks, sks = [], [], []
    for iid, label in zip(keys["image_id"].to_pylist(), keys["label"].to_pylist()):
        ik = image_keys.get(iid)
        if ik is None:
            continue
        ids.append(iid)
        iks.append(ik)
        sks.append(score_key(clip_id, ik, label_prompts[int(label)]))
    table = pa.table({"image_id": pa.array(ids, pa.string()), "image_key": pa.array(iks, pa.string()),
                      "score_key": pa.array(sks, pa.string())})
    paths.store("score", "score_keys.parquet").write_parquet(table)
    return {"store": meta["store"], "clip_identity": clip_id, "table": table}


def _store_lock(cfg: "ExperimentConfig", keyed: Optional[dict]):
    import contextlib

    from discl_ray.generation.store import writer_lock

    return writer_lock(keyed["store"], f"score {cfg.experiment}") if keyed else contextlib.nullcontext()


def _store_scores(store: str, wanted: pa.Array) -> Optional[pa.Table]:
    from discl_ray.generation.store import STORE_SCORE_SCHEMA
    from discl_ray.runtime.storage import as_storage

    d = as_storage(store).join("scores")
    if not d.parquet_files():
        return None
    table = read_parquet_dir(d, STORE_SCORE_SCHEMA.names)
    table = table.filter(pc.is_in(table["score_key"], value_set=wanted))
    if not table.num_rows:
        return None
    # one row per score key (a key scored twice holds the same numbers)
    idx = pc.index_in(pc.unique(table["score_key"]), table["score_key"])
    return table.take(idx)


def _reuse_from_store(cfg: "ExperimentConfig", out: "Storage", todo: pa.Table, keyed: dict, clip_model: str) -> int:
    """Copy the store's scores of ``todo``'s content into this experiment's ``scores/``; returns how many."""
    kt = keyed["table"].filter(pc.is_in(keyed["table"]["image_id"], value_set=todo["image_id"].combine_chunks()))
    found = _store_scores(keyed["store"], kt["score_key"].combine_chunks())
    if found is None:
        return 0
    rows = todo.join(kt, "image_id", join_type="inner").join(
        found.drop_columns(["image_key", "clip_model"]), "score_key", join_type="inner")
    rows = rows.sort_by("image_id")
    rows = rows.append_column("clip_model", pa.array([clip_model] * rows.num_rows, pa.string()))
    table = rows.select(SCORE_COLUMNS)
    table = table.cast(pa.schema([(c, t) for c, t in zip(SCORE_COLUMNS, [
        pa.string(), pa.string(), pa.int64(), pa.float64(), pa.int64(), pa.float64(), pa.float64(), pa.float64(),
        pa.string()])]))
    out.join("scores", f"{_part(table['image_id'].to_pylist())}.parquet").write_parquet(table)
    return table.num_rows


def _publish_to_store(cfg: "ExperimentConfig", out: "Storage", todo: pa.Table, keyed: dict) -> None:
    """Add the scores made now to the store (one part named by its score keys)."""
    from discl_ray.generation.store import STORE_SCORE_SCHEMA, _h
    from discl_ray.runtime.storage import as_storage

    new = read_parquet_dir(out.join("scores"), ["image_id", "clip_text_cos", "clip_image_cos", "clip_score"])
    new = new.filter(pc.is_in(new["image_id"], value_set=todo["image_id"].combine_chunks()))
    rows = new.join(keyed["table"], "image_id", join_type="inner")
    known = _store_scores(keyed["store"], rows["score_key"].combine_chunks())
    if known is not None:
        rows = rows.filter(pc.invert(pc.is_in(rows["score_key"], value_set=known["score_key"].combine_chunks())))
    if not rows.num_rows:
        return
    rows = rows.sort_by("score_key")
    table = pa.table({"score_key": rows["score_key"], "image_key": rows["image_key"],
                      "clip_text_cos": rows["clip_text_cos"], "clip_image_cos": rows["clip_image_cos"],
                      "clip_score": rows["clip_score"],
                      "clip_model": pa.array([keyed["clip_identity"]] * rows.num_rows, pa.string())},
                     schema=STORE_SCORE_SCHEMA)
    as_storage(keyed["store"]).join("scores", f"part-{_h(*table['score_key'].to_pylist())}.parquet").write_parquet(table)


def finalize(ctx: StageContext, keys: pa.Table, clip_model: str, scored: int,
             skipped: int, errors: int, actors: Optional[list] = None, reused: int = 0,
             store: Optional[dict] = None) -> ScoreResult:
    """Kept ids, summary.json and histograms from all scores; logged to MLflow when enabled.

    ``kept/`` holds only ids and scores of the rows at or above the threshold (the spectrum is not copied:
    readers join it with ``generate/spectrum``)."""
    import tempfile

    cfg = ctx.cfg
    out = ctx.paths.store("score")
    scores = _read_optional(out.join("scores"), SCORE_COLUMNS)
    if scores is None:
        scores = pa.table({c: pa.array([], t) for c, t in zip(SCORE_COLUMNS, [
            pa.string(), pa.string(), pa.int64(), pa.float64(), pa.int64(), pa.float64(), pa.float64(),
            pa.float64(), pa.string()])})
    scores = scores.filter(pc.is_in(scores["image_id"], value_set=keys["image_id"].combine_chunks()))
    all_errors = _read_optional(out.join("errors"))
    n_errors = len(pc.unique(all_errors["image_id"])) if all_errors is not None else 0
    threshold = cfg.scoring.threshold
    kept = filter_scores(scores, threshold)
    replace_parquet_dir(kept.select(["image_id", "lam", "clip_text_cos"]), out.join("kept"), prefix="kept")
    names = dict(zip(keys["label"].to_pylist(), keys["class_name"].to_pylist()))
    summary = summarize(scores, threshold, clip_model, names, n_errors)
    summary["actors"] = actors or []
    summary["scored"], summary["reused"] = int(scored), int(reused)
    summary["store"] = store["store"] if store else None
    out.join("summary.json").write_text(json.dumps(summary, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        local = plot_histograms(scores, Path(tmp), threshold, bins=cfg.scoring.histogram_bins)
        hists = []
        for h in local:
            out.join(h.name).write_bytes(h.read_bytes())
            hists.append(local_or_storage(out.join(h.name)))
        if cfg.tracking.enabled:
            summary_file = Path(tmp, "summary.json")
            summary_file.write_text(json.dumps(summary, indent=1))
            _log_mlflow(ctx, summary, [summary_file, *local])
    return ScoreResult(scored=scored, skipped=skipped, errors=errors, total=scores.num_rows,
                       kept=kept.num_rows, out_dir=local_or_storage(out), histograms=hists, reused=reused)


def _log_mlflow(ctx: StageContext, summary: dict, artifacts: list[Path]) -> None:
    import mlflow

    from discl_ray.runtime import tracking

    cfg = ctx.cfg
    metrics = {"total": summary["total"], "kept": summary["kept"], "errors": summary["errors"]}
    if summary["kept_frac"] is not None:
        metrics["kept_frac"] = summary["kept_frac"]
    for lam, group in summary["per_lam"].items():
        metrics[f"kept_frac_lam_{lam}"] = group["kept_frac"]
        if group["clip_text_cos"]["mean"] is not None:
            metrics[f"clip_text_cos_mean_lam_{lam}"] = group["clip_text_cos"]["mean"]
    from discl_ray.generation.store import log_store_input

    with tracking.run(cfg, "score", run_name=f"score-{cfg.experiment}", tags={"clip_model": summary["clip_model"]},
                      uri=ctx.tracking_uri, paths=ctx.paths):
        log_store_input(cfg, "score", ctx.paths)
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="score")
