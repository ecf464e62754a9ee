"""`discl rehearse` of every shipped experiment config (sweeps included: one trial), on the toy-size fakes of
each dataset (tests/fakes.py; the toy worlds build their own), on this session's local Ray cluster, with a
tmp run root and MLflow in sqlite under it. Slow: one rehearsal is 40-90 s on 2 cores. The two configs the
workstation test submits (tests/test_rehearse_workstation.py) run here too, in-process.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from fakes import fake_cifar100, fake_imagenet_lt, fake_inat2018, fake_iwildcam

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.name != "base.yaml")
# CIFAR-100-LT keeps n_c = ⌊n · r^(−c/4)⌋ of the fake's n images per class: at n = 80 the four biggest classes are
# 80, 25, 8, 2 (r = 100) and 80, 30, 11, 4 (r = 50), i.e. many, medium and few under the rehearsal's boundaries
# (12 / 6); at 100, r = 50 gives 100, 37, 14, 5: no medium class, so no long-tail report row.
CIFAR_TRAIN_PER_CLASS = 80
FAKES = {"imagenet_lt": fake_imagenet_lt, "iwildcam": fake_iwildcam,
         "cifar100_lt": lambda root: fake_cifar100(root, train_per_class=CIFAR_TRAIN_PER_CLASS),
         "inat2018": fake_inat2018}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakes")
    return {name: make(root / name) for name, make in FAKES.items()}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_rehearse_every_shipped_config(path, fake_roots, ray_local, tmp_path):
    from discl_ray.experiment import rehearse

    family = path.parent.name
    overrides = [f"run_root={tmp_path / 'runs'}"]
    if family in fake_roots:
        overrides.append(f"dataset.root={fake_roots[family]}")
    out = io.StringIO()
    t0 = time.monotonic()
    rc = rehearse.run(str(path), overrides, out=out)
    seconds = time.monotonic() - t0
    text = out.getvalue()
    print(text)
    steps = rehearse.plan(str(path), overrides)
    exp = steps[-1].experiment
    report = json.loads((tmp_path / "runs" / exp / "rehearsal.json").read_text())
    failed = [(s["name"], s.get("error")) for s in report["stages"] if not s["ok"]]
    assert rc == 0 and report["ok"], (failed, text[-4000:])
    # every stage of the plan ran, upstream experiments first, each under a `_rehearsal` name
    assert [(s["experiment"], s["stage"]) for s in report["stages"]] == [(s.experiment, s.stage) for s in steps]
    assert all(s["experiment"].endswith(rehearse.SUFFIX) for s in report["stages"])
    trained = [s for s in report["stages"] if s["stage"] in ("train", "sweep") and s["experiment"] == exp]
    assert trained and trained[0]["objects_written"] > 0
    # the stand-ins stay tiny: no written object of a stage over 8 MB (a checkpoint with Adam's moments included).
    # The toy worlds rehearse with their own models, not stand-ins (a FLYP checkpoint of the toy CLIP is ~20 MB).
    if family != "toy":
        for s in report["stages"]:
            assert s.get("bytes_written", 0) < 8e6 * max(1, s.get("objects_written", 1)), s
    print(f"REHEARSAL {family}/{path.stem}: {seconds:.1f} s, {len(report['stages'])} stages")
