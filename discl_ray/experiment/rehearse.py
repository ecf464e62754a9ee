"""``discl rehearse``: a config's whole pipeline in miniature, on the cluster, storage and MLflow it names.

Before a team spends GPU hours on an experiment it runs::

    discl rehearse --config configs/iwildcam/discl_adaptive.yaml run_root=s3://bucket/runs

which runs every stage the experiment needs — its upstream experiments first (the FLYP baseline iWildCam mines
with, the CE baseline a long-tail DisCL run starts from), then mine → prompts → generate → score → train (or
sweep) → report — on a few classes and images of the real dataset (``dataset.max_classes`` /
``dataset.max_per_class``), with tiny random-weight stand-ins of the configured generator, CLIP filter and classifier
backbone (CLIP or ResNet-10; :mod:`discl_ray.experiment.standins`, a few MB each; nothing is downloaded), one curriculum and one real-only epoch,
under experiment names ending in ``_rehearsal``. Everything else — ``ray.address``, ``run_root``,
``MLFLOW_TRACKING_URI``, resources per actor and worker — is the config's own, so the rehearsal meets the
cluster's real scheduling, storage and tracking.

It prints one line per stage (what ran, on which nodes, the GPUs its actors held, the objects it wrote, its
MLflow runs) and writes ``rehearsal.json`` into the rehearsal's run folder. Exit 0 only when every stage passed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from discl_ray.errors import UserError

log = logging.getLogger(__name__)

SUFFIX = "_rehearsal"
DEFAULT_CLASSES = 4
DEFAULT_PER_CLASS = 12
# Stages of an experiment that trains on a spectrum (its upstream baselines run `train` only).
DATA_STAGES = ("mine", "prompts", "generate", "score")
TOY_DATASETS = ("digits_world", "digits_lt", "digits_lq")


@dataclass
class Step:
    """One stage of the rehearsal: ``stage`` of ``config`` with ``overrides`` (experiment ``experiment``)."""

    stage: str
    experiment: str
    config: str
    overrides: list[str]
    role: str = "experiment"          # "experiment" or "upstream (<setting>)"
    record: dict = field(default_factory=dict)


def yaml_value(value) -> str:
    return json.dumps(value)


def is_baseline(cfg) -> bool:
    return cfg.training.strategy == "none" and not cfg.sweep.space


def stages_of(cfg) -> list[str]:
    """The stages that make ``cfg``'s experiment, in order."""
    first = ["world"] if cfg.dataset.name in TOY_DATASETS else []
    last = ["report"] if cfg.tracking.enabled else []     # `discl report` reads the runs from MLflow
    if is_baseline(cfg):
        return first + ["train", *last]
    return first + [*DATA_STAGES, "sweep" if cfg.sweep.space else "train", *last]


def miniature(cfg, classes: int, per_class: int, rename: dict[str, str]) -> list[str]:
    """Overrides that shrink ``cfg`` to a rehearsal (its cluster, storage and tracking untouched)."""
    tc, m = cfg.training, cfg.mining
    o = {
        "experiment": cfg.experiment + SUFFIX,
        "dataset.max_classes": classes,
        "dataset.max_per_class": per_class,
        "generation.seeds": [0],
        "generation.steps": 10,
        "generation.height": 32,
        "generation.width": 32,
        "generation.batch_size": 4,
        "generation.actors_min": None,
        "generation.actors_max": 1,
        "generation.grid_sources": 2,
        "scoring.batch_size": 16,
        "scoring.actors_min": None,
        "scoring.actors_max": 1,
        "scoring.threshold": -1.0,              # random stand-in CLIP: keep every image, so later stages have data
        "training.epochs": 2,
        "training.curriculum_epochs": 1 if tc.curriculum_epochs else 0,
        "training.batch_size": 8,
        "training.eval_batch_size": 16,
        "training.image_size": 32,
        "training.warmup_steps": 0,
        "training.num_workers": 1,
        "training.cpus_per_worker": 1,
        "training.random_real_size": 16,
        "training.guidance_val_size": 4,
        "mining.batch_size": 16,
    }
    if getattr(tc, "lp_epochs", None):          # LP-FT: one linear-probe epoch, then one fine-tuning epoch
        o["training.lp_epochs"] = 1
    if cfg.dataset.name in TOY_DATASETS:      # the toy world's own models are already tiny
        for key in [k for k in o if k.startswith(("generation.", "scoring.")) and k != "scoring.threshold"]:
            o.pop(key)
        o.pop("training.image_size")
        o.pop("dataset.max_classes")
    if tc.init_from:
        exp, _, run = tc.init_from.partition("/")
        o["training.init_from"] = rename.get(exp, exp) + (f"/{run}" if run else "")
    if m.classifier_from:
        exp, _, run = m.classifier_from.partition("/")
        o["mining.classifier_from"] = rename.get(exp, exp) + (f"/{run}" if run else "")
    if m.mode == "confidence":
        o["mining.target_count"] = max(2, classes * per_class // 4)
        o["mining.lowest_k"] = None
        o["mining.class_quantile"] = None
        o["mining.threshold"] = None
    else:
        # frequency: the miniature's per-class counts decide the groups (few < per_class / 2 ≤ medium < many).
        # The toy worlds too: dataset.max_per_class caps digits-LT's head (50, 35, 24, …) at per_class, so its own
        # boundaries (many ≥ 20) would leave the "many" group empty, its test accuracy NaN, and `discl report`
        # with no complete long-tail row ("no finished training runs").
        o["mining.few_max"] = max(2, per_class // 2)
        o["mining.many_min"] = max(per_class, o["mining.few_max"] + 1)
        # On a real long-tail dataset the kept (biggest) classes all reach per_class: all "many". The miniature
        # then caps their training rows on a descending profile so every group has classes (dataset config).
        o["dataset.miniature_groups"] = [o["mining.few_max"], o["mining.many_min"]]
    if cfg.tracking.experiment_name:
        o["tracking.experiment_name"] = cfg.tracking.experiment_name + SUFFIX
    if cfg.sweep.space:                        # one trial: the first value of every axis
        space = {}
        for key, spec in cfg.sweep.space.items():
            if key in ("training.threshold", "scoring.threshold"):
                # a swept CLIP threshold is the real CLIP's scale; the random stand-in's cosines sit near 0, so
                # the trial keeps every image as the rehearsal's scoring does (else adaptive gets no hard source)
                space[key] = {"grid": [o["scoring.threshold"]]}
            elif isinstance(spec, dict) and "grid" in spec:
                space[key] = {"grid": list(spec["grid"])[:1]}
            else:
                space[key] = spec
        o["sweep.space"] = space
        o["sweep.num_samples"] = 1
        o["sweep.max_concurrent_trials"] = 1
        o["sweep.name"] = "rehearsal"
    return [f"{k}={yaml_value(v)}" for k, v in o.items()]


def plan(config: str, overrides: list[str], classes: int = DEFAULT_CLASSES,
         per_class: int = DEFAULT_PER_CLASS) -> list[Step]:
    """Every step of the rehearsal of ``config`` (upstream experiments first), validated before any work."""
    from discl_ray.config import load_config
    from discl_ray.experiment.upstream import upstream_of, upstream_overrides

    steps: list[Step] = []
    seen: set[str] = set()

    def visit(path: str, user: list[str], role: str, depth: int = 0) -> None:
        cfg = load_config(path, user)
        if cfg.experiment in seen:
            return
        if depth > 5:
            raise UserError(f"{path}: upstream experiments nest too deep (a cycle?)")
        seen.add(cfg.experiment)
        rename = {}
        for up in upstream_of(cfg, path):
            if up.config is None:
                raise UserError(f"{up.setting}={up.experiment}: no config beside {path} defines experiment "
                                 f"{up.name!r}, so the rehearsal cannot train it")
            visit(str(up.config), upstream_overrides(user), f"upstream ({up.setting})", depth + 1)
            rename[up.name] = up.name + SUFFIX
        mini = miniature(cfg, classes, per_class, rename)
        load_config(path, [*user, *mini])      # the miniature validates too, before any cluster work
        own = stages_of(cfg) if role == "experiment" else [s for s in stages_of(cfg) if s != "report"]
        for stage in own:
            steps.append(Step(stage, cfg.experiment + SUFFIX, path, [*user, *mini], role))

    visit(config, list(overrides), "experiment")
    return steps


# ---------------------------------------------------------------------------------------------------- running


def _cluster_nodes() -> dict[str, dict]:
    import ray

    return {n["NodeID"]: {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")}


def _driver_ip() -> Optional[str]:
    """The address this driver registered at (127.0.0.1 beside a workstation head)."""
    try:
        import ray

        return ray._private.worker.global_worker.node_ip_address
    except Exception:  # noqa: BLE001 — bookkeeping
        return None


def _actors_since(t0_ms: int) -> list[dict]:
    """Actors started since ``t0_ms`` (Ray's state API; empty when the dashboard is not running)."""
    try:
        from ray.util.state import list_actors

        rows = list_actors(detail=True, limit=10000, raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 — where-it-ran is bookkeeping; it must not fail a stage
        log.debug("no actor list: %s", err)
        return []
    out = []
    for a in rows:
        a = a if isinstance(a, dict) else a.__dict__
        if (a.get("start_time") or 0) >= t0_ms:
            out.append({"class_name": a.get("class_name"), "node_id": a.get("node_id"),
                        "resources": a.get("required_resources") or {}, "actor_id": a.get("actor_id")})
    return out


def _recorded_actors(stage_store, written: dict[str, int]) -> list[dict]:
    """Where the stage's own actors say they ran: the generator, scorer and mining actors in the stage's
    ``summary.json`` (``actors``), the Train workers in ``<run>/workers/rank-<r>.json``. Ray's state API needs
    the dashboard's state endpoint, which a job's driver cannot always reach; these records travel with the
    outputs (an object store included)."""
    from discl_ray.runtime.storage import as_storage

    found: list[dict] = []
    for uri in written:
        name = uri.rsplit("/", 1)[-1]
        try:
            if name == "summary.json":
                recs = json.loads(as_storage(uri).read_text()).get("actors") or []
            elif name.startswith("rank-") and name.endswith(".json") and "/workers/" in uri:
                recs = [json.loads(as_storage(uri).read_text())]
            else:
                continue
        except Exception as err:  # noqa: BLE001 — bookkeeping
            log.debug("cannot read %s: %s", uri, err)
            continue
        for a in recs:
            if isinstance(a, str):
                a = json.loads(a)
            if isinstance(a, dict) and a.get("node_id"):
                found.append({"class_name": "TrainWorker" if name.startswith("rank-") else "StageActor",
                              "node_id": a["node_id"], "resources": a.get("resources") or {},
                              "actor_id": a.get("actor_id")})
    return found


def _objects(store) -> dict[str, int]:
    try:
        if not store.exists():
            return {}
        return {str(f): f.info().size or 0 for f in store.ls(recursive=True) if f.is_file()}
    except Exception as err:  # noqa: BLE001
        log.debug("cannot list %s: %s", store, err)
        return {}


def _mlflow_runs(cfg, t0_ms: int) -> list[dict]:
    if not cfg.tracking.enabled:
        return []
    try:
        from mlflow.tracking import MlflowClient

        from discl_ray.runtime.cluster import tracking_uri

        client = MlflowClient(tracking_uri(cfg))
        exp = client.get_experiment_by_name(cfg.tracking.experiment_name or cfg.experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {t0_ms}")
        return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status} for r in runs]
    except Exception as err:  # noqa: BLE001
        log.debug("no MLflow runs: %s", err)
        return []


def probe_gpus(timeout_s: float = 600.0) -> Optional[dict]:
    """Whether the cluster's GPU nodes give torch a CUDA device: one 1-GPU task (it also makes an autoscaler
    start a GPU node). None when the cluster has no GPU resource now."""
    import ray

    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1, num_cpus=0)
    def _probe():
        import torch

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "cuda": torch.cuda.is_available(),
                "devices": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)
                if torch.cuda.is_available() else None}

    return ray.get(_probe.remote(), timeout=timeout_s)


def _record(step: Step, cfg, ok: bool, rc: int, seconds: float, t0_ms: int, before: dict, error: str,
            nodes: dict) -> dict:
    from discl_ray.runtime.cluster import RunPaths

    stage_store = RunPaths.from_config(cfg).store(step.stage if step.stage != "world" else "dataset")
    after = _objects(stage_store)
    written = {k: v for k, v in after.items() if before.get(k) != v}
    actors = _actors_since(t0_ms) if step.stage not in ("prompts", "report") else []
    actors += _recorded_actors(stage_store, written)
    actors = list({a.get("actor_id") or id(a): a for a in actors}.values())   # one entry per actor
    used = sorted({a["node_id"] for a in actors if a.get("node_id")})
    gpus = sum(float(a["resources"].get("GPU", 0)) for a in actors)
    return {"name": f"{step.experiment}:{step.stage}", "stage": step.stage, "experiment": step.experiment,
            "role": step.role, "ok": ok, "rc": rc, "seconds": round(seconds, 2), "error": error,
            "nodes": used, "gpu_nodes": [n for n in used if nodes.get(n, {}).get("GPU")],
            "actors": sorted({a["class_name"] or "?" for a in actors}), "gpus_held": gpus,
            "objects_written": len(written), "bytes_written": sum(written.values()), "location": str(stage_store),
            "mlflow_runs": _mlflow_runs(cfg, t0_ms)}


def format_line(i: int, n: int, rec: dict) -> str:
    where = (f"nodes {len(rec['nodes'])}" + (f" (GPU node {', '.join(x[:8] for x in rec['gpu_nodes'])})"
                                             if rec["gpu_nodes"] else "")) if rec["nodes"] else "driver"
    runs = ", ".join(r["run_id"][:8] for r in rec["mlflow_runs"]) or "none"
    status = "ok" if rec["ok"] else f"FAILED (code {rec['rc']})"
    return (f"rehearse [{i}/{n}] {rec['experiment']}: {rec['stage']:<8} {status}  {rec['seconds']:.1f} s  "
            f"{where}  GPUs held {rec['gpus_held']:g}  objects {rec['objects_written']} "
            f"({rec['bytes_written'] / 1e6:.2f} MB) in {rec['location']}  MLflow runs {runs}")


def run(config: str, overrides: list[str], classes: int = DEFAULT_CLASSES, per_class: int = DEFAULT_PER_CLASS,
        out=None) -> int:
    """Run the rehearsal; 0 when every stage passed, 1 when one failed (the rest are listed as not run)."""
    import importlib
    import sys

    # torch (and diffusers, open_clip) before pyarrow's S3 client starts: loaded after it, torch's MKL fails to
    # load libtorch_cpu ("Intel oneMKL FATAL ERROR") in a Ray job's driver with an s3:// run root.
    import torch  # noqa: F401

    from discl_ray.cli import COMMANDS
    from discl_ray.config import load_config
    from discl_ray.runtime.cluster import RunPaths, init_ray
    from discl_ray.runtime.storage import as_storage

    out = out or sys.stdout
    steps = plan(config, overrides, classes, per_class)
    main_cfg = load_config(config, steps[-1].overrides)
    paths = RunPaths.from_config(main_cfg)
    init_ray(main_cfg)
    nodes = _cluster_nodes()
    extra: list[str] = []
    gpu = None
    try:
        gpu = probe_gpus()
    except Exception as err:  # noqa: BLE001 — reported, and the stages then meet the same problem
        print(f"rehearse: GPU probe failed: {err}", file=out, flush=True)
    if gpu is not None and not gpu["cuda"]:
        extra.append("training.dist_backend=gloo")
        print(f"rehearse: GPU node {gpu['node_id'][:8]} holds a Ray GPU resource but torch sees no CUDA device "
              "(stand-in GPU node, or a driver older than the image's CUDA needs): stages run there on its CPU, "
              "Train workers with the gloo backend", file=out, flush=True)
    elif gpu is not None:
        print(f"rehearse: GPU node {gpu['node_id'][:8]}: {gpu['devices']} × {gpu['name']}", file=out, flush=True)
    import ray

    if not ray.cluster_resources().get("GPU") and not main_cfg.ray.address:
        extra.append("training.gpus_per_worker=0")  # the embedded local cluster of a laptop: no GPU to wait for
    print(f"rehearse: {len(steps)} stages on {len(nodes)} node(s) "
          f"({', '.join(f'{k[:8]}: {v}' for k, v in nodes.items())}); run folder {paths.exp}", file=out, flush=True)
    # Stand-ins, built once per run root (same seed, same bytes) where every node can read them.
    models = as_storage(paths.exp).join("rehearsal", "models")
    standin: dict[str, list[str]] = {}
    built: dict[str, dict[str, str]] = {}     # each stand-in built and uploaded once, shared by upstream configs
    records: list[dict] = []
    t_all = time.monotonic()
    failed = False
    for i, step in enumerate(steps, 1):
        if failed:
            records.append({"name": f"{step.experiment}:{step.stage}", "stage": step.stage,
                            "experiment": step.experiment, "role": step.role, "ok": False, "rc": None,
                            "seconds": 0.0, "error": "not run (an earlier stage failed)"})
            continue
        base_cfg = load_config(step.config, step.overrides)
        if base_cfg.dataset.name not in TOY_DATASETS and step.config not in standin:
            from discl_ray.experiment.standins import build_standins

            standin[step.config] = [f"{k}={v}" for k, v in build_standins(base_cfg, models, built).items()]
        argv = ["--config", step.config, *step.overrides, *standin.get(step.config, []), *extra]
        cfg = load_config(step.config, argv[2:])
        before = _objects(RunPaths.from_config(cfg).store(step.stage if step.stage != "world" else "dataset"))
        t0, t0_ms = time.monotonic(), int(time.time() * 1000) - 1000
        rc, error = 1, ""
        try:
            module = importlib.import_module(COMMANDS[step.stage][0])
            rc = int(module.main(argv) or 0)
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 1
        except Exception as err:  # noqa: BLE001 — recorded; the rehearsal reports and stops
            log.exception("rehearse: %s %s raised", step.experiment, step.stage)
            rc, error = 1, f"{type(err).__name__}: {err}"
        rec = _record(step, cfg, rc == 0, rc, time.monotonic() - t0, t0_ms, before, error, nodes)
        records.append(rec)
        print(format_line(i, len(steps), rec), file=out, flush=True)
        failed = rc != 0
    ok = all(r["ok"] for r in records)
    summary = {"config": config, "overrides": list(overrides), "classes": classes, "per_class": per_class,
               "ok": ok, "seconds": round(time.monotonic() - t_all, 2), "cluster": nodes, "driver_ip": _driver_ip(), "gpu_probe": gpu,
               "stages": records}
    target = as_storage(paths.exp).join("rehearsal.json")
    target.write_text(json.dumps(summary, indent=1, default=str))
    passed = sum(r["ok"] for r in records)
    print(f"rehearse: {passed}/{len(records)} stages passed in {summary['seconds']:.1f} s; {target}",
          file=out, flush=True)
    return 0 if ok else 1


def main_args(argv: list[str]) -> tuple[Optional[str], list[str], int, int, bool]:
    import argparse

    p = argparse.ArgumentParser(prog="discl rehearse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="the experiment YAML to rehearse")
    p.add_argument("--classes", type=int, default=DEFAULT_CLASSES, help="classes of the real dataset kept")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="images per class and split kept")
    p.add_argument("--plan", action="store_true", help="print the stages and overrides; run nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    return a.config, list(a.overrides), a.classes, a.per_class, a.plan


def describe(steps: list[Step]) -> str:
    lines = []
    for i, s in enumerate(steps, 1):
        lines.append(f"[{i}/{len(steps)}] {s.experiment}: {s.stage}  ({s.role}; {Path(s.config).name})")
    return "\n".join(lines)
