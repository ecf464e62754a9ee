"""Driver-side checks that run before any cluster work: inputs a user can get wrong, caught in seconds.

    notes = check(ctx, "generate")     # raises PreflightError naming the input and the fix

Each stage's entry point calls :func:`check` right after its config validates (``cli.stage.run_stage``), so
a missing model folder, a stage run out of order or an unreachable MLflow server ends as one
``discl <stage>: …`` line and exit status 2 instead of a traceback from inside a Ray actor minutes later.
Checks read only small columns (ids, labels, λ, scores), never images. What they cannot know up front (a
corrupt image, a class without prompts) is left to the stages, which turn it into error rows; the returned
notes say so. ``docs/reliability.md`` lists every case and the test that proves it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from discl_ray.errors import UserError
from discl_ray.runtime.context import StageContext

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig

# Stages whose run ends by logging to MLflow: an unreachable server must stop them before the work, not after.
TRACKED = {"generate", "score", "train", "sweep", "report"}


class PreflightError(UserError):
    """A bad input the user can fix; the message names it and what to do."""


def check(ctx: "StageContext | ExperimentConfig", stage: str) -> list[str]:
    """Run the checks of ``stage``; returns notes (kept going, but worth saying), raises PreflightError."""
    ctx = StageContext.of(ctx, stage)
    notes: list[str] = []
    if stage in TRACKED and ctx.cfg.tracking.enabled:
        check_tracking(ctx)
    checker = {"mine": _mine, "generate": _generate, "score": _score, "train": _train, "sweep": _sweep}.get(stage)
    if checker:
        checker(ctx, notes)
    if stage in ROWS:
        check_dataset(ctx)
    return notes


# Stages that read the canonical rows (materialized once, in the driver, before any cluster work).
ROWS = {"mine", "prompts", "generate", "score", "train", "sweep"}


def check_dataset(ctx: StageContext) -> None:
    """Build (or reuse) the experiment's canonical rows: a missing or malformed dataset root fails here."""
    from discl_ray.data import materialize
    from discl_ray.data.loaders.common import DatasetError

    try:
        materialize(ctx.cfg, paths=ctx.paths)
    except (DatasetError, FileNotFoundError) as err:
        raise PreflightError(f"dataset {ctx.cfg.dataset.name}: {err}") from None


def check_tracking(ctx: StageContext) -> None:
    from discl_ray.runtime.tracking import TrackingUnavailable, check_reachable

    try:
        check_reachable(ctx.tracking_uri)
    except TrackingUnavailable as err:
        raise PreflightError(str(err)) from None


def tracking_lost(ctx: "StageContext | ExperimentConfig") -> Optional[str]:
    """After a failed run: the tracking server's URI and why, when it no longer answers (else None)."""
    from discl_ray.runtime.tracking import TrackingUnavailable, check_reachable

    ctx = StageContext.of(ctx, "train")
    if not ctx.cfg.tracking.enabled:
        return None
    try:
        check_reachable(ctx.tracking_uri, timeout=3.0, patience=10.0)
    except TrackingUnavailable as err:
        return str(err)
    return None


# -- helpers ------------------------------------------------------------------------------------------
def _is_remote(path: str) -> bool:
    return "://" in path


def _looks_local(model: str) -> bool:
    """A model string that can only be a local folder (a hub id is exactly ``org/name``)."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1 or Path(model).exists()) and not _is_remote(model)


def _table(directory, columns=None, stage: str = "", cmd: str = ""):
    from discl_ray.runtime.io import read_parquet_dir

    try:
        return read_parquet_dir(directory, columns)
    except FileNotFoundError:
        raise PreflightError(f"no {stage} table at {directory}; run `{cmd}` first") from None


def _hard_table(ctx: StageContext, notes: list[str]):
    """The hard-sample table, with duplicate ids checked: same label → one spectrum (a note); else an error."""
    hard = _table(ctx.paths.stage("mine"), ["image_id", "label"], "mine", "discl mine")
    ids, labels = hard["image_id"].to_pylist(), hard["label"].to_pylist()
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        by_id: dict[str, set] = {}
        for i, y in zip(ids, labels):
            by_id.setdefault(i, set()).add(y)
        clash = [i for i in dup if len(by_id[i]) > 1]
        if clash:
            raise PreflightError(f"the hard-sample table lists {len(clash)} image_ids with conflicting labels "
                                 f"(e.g. {clash[0]!r}: {sorted(by_id[clash[0]])}); rerun `discl mine`")
        notes.append(f"{len(dup)} hard image_ids are listed more than once (e.g. {dup[0]!r}); each gets one spectrum")
    return hard


def check_clip(scoring, cache: Path, what: str = "scoring") -> None:
    """The open_clip architecture JSON and weights file the config names exist (toy CLIP included)."""
    from discl_ray.models.clip import resolve_clip_source

    try:
        config_path, pretrained = resolve_clip_source(scoring, cache)
    except FileNotFoundError as err:
        raise PreflightError(f"{what}: {err}") from None
    if config_path and not _is_remote(config_path) and not Path(config_path).exists():
        raise PreflightError(f"scoring.model_config_path: {config_path} does not exist")
    if pretrained and not _is_remote(pretrained) and _looks_weights_file(pretrained) and not Path(pretrained).is_file():
        raise PreflightError(f"scoring.pretrained: CLIP weights file {pretrained} does not exist "
                             "(give a local weights file or an open_clip pretrained tag)")


def _looks_weights_file(value: str) -> bool:
    return "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _world_cmd(variant: str) -> str:
    return "discl world" if variant == "clean" else f"discl world --variant {variant}"


def toy_generator(model: str, cache: Path) -> bool:
    """Whether ``model`` names a toy world's generator (``toy``, ``toy-gap``); raises when it is not built."""
    from discl_ray.toyworld import GENERATORS, generator_dir

    if model not in GENERATORS:
        return False
    folder = generator_dir(cache, GENERATORS[model])
    if not (folder / "model_index.json").is_file():
        raise PreflightError(f"generation.model={model}: the toy generator {folder} is missing; "
                             f"run `{_world_cmd(GENERATORS[model])}` first")
    return True


# -- per stage ----------------------------------------------------------------------------------------
def _mine(ctx: "StageContext | ExperimentConfig", notes: list[str]) -> None:
    ctx = StageContext.of(ctx, "mine")
    cfg = ctx.cfg
    m = cfg.mining
    if m.mode != "confidence":
        return
    if m.classifier == "torchscript" and not Path(m.classifier_path).is_file():
        raise PreflightError(f"mining.classifier_path: {m.classifier_path} does not exist (a TorchScript .pt file)")
    from discl_ray.toyworld import CLASSIFIERS

    if m.classifier in CLASSIFIERS:
        from discl_ray.toyworld import classifier_file

        variant = CLASSIFIERS[m.classifier]
        file = classifier_file(ctx.cache, variant)
        if not file.is_file():
            raise PreflightError(f"mining.classifier={m.classifier}: the toy judge {file} is missing; run "
                                 f"`{_world_cmd(variant)}` first")
    if m.classifier == "open_clip_zero_shot":
        check_clip(cfg.scoring, ctx.cache, "mining.classifier=open_clip_zero_shot")


def _generate(ctx: StageContext, notes: list[str]) -> None:
    paths = ctx.paths
    gen = ctx.cfg.generation
    hard = _hard_table(ctx, notes)
    prompts = _table(paths.stage("prompts"), ["label", "gen_prompts"], "prompts", "discl prompts")
    have = {y for y, p in zip(prompts["label"].to_pylist(), prompts["gen_prompts"].to_pylist()) if p}
    orphan = sorted(set(hard["label"].to_pylist()) - have)
    if orphan:
        n = sum(1 for y in hard["label"].to_pylist() if y in orphan)
        notes.append(f"labels {orphan} have no generation prompts: their {n} hard images become error rows "
                     "(add prompts and rerun to fill them)")
    if toy_generator(gen.model, paths.cache):
        pass
    elif _looks_local(gen.model):
        folder = Path(gen.model).expanduser()
        if not folder.is_dir():
            raise PreflightError(f"generation.model: {gen.model} is not a folder (give a diffusers img2img "
                                 "checkpoint folder or a hub id such as stabilityai/stable-diffusion-xl-refiner-1.0)")
        if not (folder / "model_index.json").is_file():
            raise PreflightError(f"generation.model: {gen.model} has no model_index.json; it is not a diffusers "
                                 "pipeline folder (save one with pipeline.save_pretrained)")
    from discl_ray.generation.plan import check_existing

    try:
        check_existing(paths.stage("generate", "spectrum"), gen)
    except ValueError as err:
        raise PreflightError(str(err)) from None


def _score(ctx: StageContext, notes: list[str]) -> None:
    from discl_ray.runtime.io import parquet_files

    cfg, paths = ctx.cfg, ctx.paths
    if not parquet_files(paths.stage("generate", "spectrum")):
        raise PreflightError(f"no spectrum parquet in {paths.stage('generate', 'spectrum')}; "
                             "run `discl generate` first")
    check_clip(cfg.scoring, paths.cache)


def _train_inputs(ctx: StageContext, notes: list[str]) -> None:
    """Files every training config needs: the start checkpoint and the CLIP weights."""
    cfg = ctx.cfg
    tc = cfg.training
    if tc.init_from:           # the baseline run this one starts from must exist (Algorithm 1's pretrained f_θ)
        from discl_ray.training.init_from import resolve_checkpoint

        try:
            resolve_checkpoint(cfg, tc.init_from, uri=ctx.tracking_uri if cfg.tracking.enabled else None,
                               paths=ctx.paths)
        except (FileNotFoundError, ValueError) as err:
            raise PreflightError(str(err)) from None
    if tc.init_checkpoint and not _is_remote(tc.init_checkpoint):
        p = Path(tc.init_checkpoint)
        if not (p.is_file() or (p / "state.pt").is_file() or (p / "model.pt").is_file()):
            raise PreflightError(f"training.init_checkpoint: {tc.init_checkpoint} is neither a model.pt file "
                                 "nor a checkpoint folder (with state.pt or model.pt)")
    if tc.backbone == "clip":
        check_clip(cfg.scoring, ctx.cache, "training.backbone=clip")


def visited_lams(tc) -> list[float]:
    """The synthetic λ levels (< 1) a strategy can train on."""
    if tc.strategy == "none":
        return []
    if tc.strategy == "fixed":
        return [tc.fixed_lam] if tc.fixed_lam < 1.0 else []
    if tc.strategy == "text_only":
        return [0.0]
    return [v for v in tc.lams if v < 1.0]


def _train(ctx: StageContext, notes: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    _train_inputs(ctx, notes)
    cfg, paths = ctx.cfg, ctx.paths
    tc = cfg.training
    if tc.strategy == "none":
        return
    hard = _hard_table(ctx, notes)
    lams = visited_lams(tc)
    if not lams:
        return
    spec = _table(paths.stage("generate", "spectrum"), ["image_id", "source_image_id", "lam"], "spectrum",
                  "discl generate")
    scores = _table(paths.stage("score", "scores"), ["image_id", "clip_text_cos"], "scores", "discl score")
    threshold = tc.threshold if tc.threshold is not None else cfg.scoring.threshold
    joined = spec.join(scores, "image_id", join_type="inner")
    lam_col = pc.round(joined["lam"], 6)
    in_set = pc.and_(pc.is_in(lam_col, pa.array([round(v, 6) for v in lams])),
                     pc.is_in(joined["source_image_id"], pa.array(sorted(set(hard["image_id"].to_pylist())),
                                                                   pa.string())))
    candidates = joined.filter(in_set)
    kept = candidates.filter(pc.fill_null(pc.greater_equal(candidates["clip_text_cos"], threshold), False))
    if kept.num_rows == 0:
        cos = [c for c in candidates["clip_text_cos"].to_pylist() if c is not None and not math.isnan(c)]
        span = f"scores range {min(cos):.3f}..{max(cos):.3f}" if cos else "no scored rows at those λ"
        raise PreflightError(f"training.strategy={tc.strategy}: the filtered spectrum is empty: threshold "
                             f"{threshold} keeps 0 of {candidates.num_rows} scored synthetic rows of hard images "
                             f"at λ in {lams} ({span}); lower training.threshold or generate/score more")
    per_lam = Counter(round(v, 6) for v in kept["lam"].to_pylist())
    empty = [v for v in lams if per_lam.get(round(v, 6), 0) == 0]
    if empty:
        notes.append(f"threshold {threshold} leaves no synthetic rows at λ in {empty}: those epochs train on "
                     "real rows only")
    if tc.strategy == "adaptive":
        sources = set(kept["source_image_id"].to_pylist())
        if len(sources) < 2:
            raise PreflightError(f"training.strategy=adaptive needs synthetic rows of at least 2 hard sources to "
                                 f"hold some out as its guidance-validation set (threshold {threshold} keeps "
                                 f"{len(sources)}); lower training.threshold or generate more")


def _sweep(ctx: StageContext, notes: list[str]) -> None:
    # Trials vary thresholds, λ sets and strategies: only what every trial needs is checked here.
    _train_inputs(ctx, notes)
