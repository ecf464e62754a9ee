"""One stage context per stage: following the config through ``discl generate``, ``discl train`` and ``discl
sweep`` resolves the run's locations (``RunPaths.from_config``), the MLflow tracking URI (``tracking_uri``) and
the Ray address (``cluster_address``) exactly once per stage, in the driver.

Real stages on small inputs (a tiny diffusers img2img pipeline, the trainer's parquet fixture, a one-trial Tune
sweep), MLflow in sqlite, the session's local Ray cluster. The counters wrap the three functions wherever the
package holds a reference to them, so an import by name (``from … import tracking_uri``) is counted too.

    pytest tests/test_stage_context.py -q -m 'slow or not slow'   # generate (default suite), train, sweep (slow)
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import yaml

from discl_ray.config import load_config
from discl_ray.runtime import cluster
from discl_ray.runtime.cluster import RunPaths
from discl_ray.runtime.context import StageContext

RESOLVERS = ("from_config", "tracking_uri", "cluster_address")


@pytest.fixture()
def resolutions(monkeypatch) -> Counter:
    """Counts calls of RunPaths.from_config, tracking_uri and cluster_address in this process."""
    counts: Counter = Counter()
    real_from_config = RunPaths.from_config.__func__

    def from_config(cls, cfg):
        counts["from_config"] += 1
        return real_from_config(cls, cfg)

    monkeypatch.setattr(RunPaths, "from_config", classmethod(from_config))
    for name in ("tracking_uri", "cluster_address"):
        real = getattr(cluster, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        # every module that imported the function by name, and the module it lives in
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith(("discl_ray", "jobs")) and getattr(mod, name, None) is real:
                monkeypatch.setattr(mod, name, counted)
    return counts


def _per_stage(counts: Counter) -> dict[str, int]:
    got = {k: counts[k] for k in RESOLVERS}
    counts.clear()
    return got


ONCE = dict.fromkeys(RESOLVERS, 1)


def _write(tmp_path, name: str, data: dict):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


TRACKED = {"log_checkpoint": False}


def _tracking(run_root) -> dict:
    return TRACKED | {"tracking_uri": f"sqlite:///{run_root / 'mlflow.db'}"}


@pytest.mark.slow  # a real generate on Ray, ~50 s under load: over the budget; run with -m 'slow or not slow'
def test_generate_resolves_each_shared_layer_once(tmp_path, ray_local, resolutions, capsys):
    """discl generate: 2 sources × λ {0} × seed 0 on a tiny SD pipeline (Ray Data, spectrum store, MLflow run)."""
    from gen_fixtures import tiny_sd_dir, write_experiment

    from jobs import generate

    run_root = tmp_path / "runs"
    cfg = write_experiment(run_root, tiny_sd_dir(tmp_path), n_sources=2, lams=[0.0], seeds=[0])
    data = cfg.model_dump(mode="json") | {"tracking": _tracking(run_root)}
    resolutions.clear()
    assert generate.main(["--config", str(_write(tmp_path, "gen", data))]) == 0, capsys.readouterr().err
    assert "generated 2" in capsys.readouterr().out
    assert _per_stage(resolutions) == ONCE


def _train_fixture(tmp_path) -> dict:
    from discl_ray.training.fixture import write_fixture

    run_root = tmp_path / "runs"
    fx = {"run_root": str(run_root), "experiment": "fx", "tracking": _tracking(run_root),
          "dataset": {"image_size": 16}, "mining": {"few_max": 10, "many_min": 30},
          "generation": {"lams": [0.0, 0.5]}, "scoring": {"threshold": 0.3},
          "training": {"backbone": "small_cnn", "strategy": "diverse_to_specific", "lams": [0.0, 0.5, 1.0],
                       "epochs": 1, "curriculum_epochs": 1, "steps_per_epoch": 1, "batch_size": 16,
                       "cpus_per_worker": 0.25, "num_workers": 1, "max_failures": 0, "guidance_val_size": 4}}
    write_fixture(load_config(data=fx))
    return fx


@pytest.mark.slow  # a Ray Train run: ~10-15 s on the shared 2-core machine; run with -m slow
def test_train_resolves_each_shared_layer_once(tmp_path, ray_local, resolutions, capsys):
    """discl train: one epoch of the small CNN on the trainer's fixture (Ray Train V2, MLflow run)."""
    from jobs import train

    fx = _train_fixture(tmp_path)
    resolutions.clear()
    assert train.main(["--config", str(_write(tmp_path, "train", fx)), "--run-name", "ctx"]) == 0, \
        capsys.readouterr().err
    assert _per_stage(resolutions) == ONCE


@pytest.mark.slow  # a Tune sweep with one Train trial: ~20-30 s on the shared 2-core machine; run with -m slow
def test_sweep_resolves_each_shared_layer_once(tmp_path, ray_local, resolutions, capsys):
    """discl sweep: one trial, whose Train run derives its context from the sweep's (in a Tune worker)."""
    from jobs import sweep

    fx = _train_fixture(tmp_path)
    sw = fx | {"sweep": {"space": {"training.seed": {"grid": [0]}}, "trial_cpus": 0.1, "name": "s"}}
    resolutions.clear()
    assert sweep.main(["--config", str(_write(tmp_path, "sweep", sw))]) == 0, capsys.readouterr().err
    assert "1 trials, 0 failed" in capsys.readouterr().out
    assert _per_stage(resolutions) == ONCE


def test_a_child_context_reuses_what_the_new_config_leaves_valid(tmp_path, resolutions, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run_root=runs", "experiment=a"])
    ctx = StageContext.open(cfg, "sweep")
    uri = ctx.tracking_uri
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" and ctx.address is None
    assert ctx.out("s1") == RunPaths.from_config(cfg).store("sweep", "s1")
    assert ctx.input("mine").path.endswith("/a/mine")
    resolutions.clear()
    # the same run root spelled absolute, the resolved URI pinned (what a sweep hands its trials): nothing again
    trial = ctx.child(cfg=load_config(None, [f"run_root={tmp_path / 'runs'}", "experiment=a",
                                             f"tracking.tracking_uri={uri}", "training.seed=3"]), stage="train")
    assert trial.paths is ctx.paths and trial.tracking_uri == uri and trial.stage == "train"
    assert trial.out() == ctx.input("train")
    assert _per_stage(resolutions) == dict.fromkeys(RESOLVERS, 0)
    # another experiment: its locations are resolved again, and only those
    other = ctx.child(cfg=load_config(None, ["run_root=runs", "experiment=b"]))
    assert other.paths.experiment == "b" and other.tracking_uri == uri
    assert _per_stage(resolutions) == {"from_config": 1, "tracking_uri": 0, "cluster_address": 0}
    # a joined cluster needs an http(s) store: said when the context's URI is first asked for
    joined = ctx.child(cfg=load_config(None, ["run_root=runs", "ray.address=10.0.0.1:6379"]))
    assert joined.address == "10.0.0.1:6379"
    with pytest.raises(cluster.TrackingConfigError, match="ray.address is set"):
        joined.tracking_uri  # noqa: B018
