"""The streamed input path inside the real trainer: 2 Ray Train workers read their slice of each epoch from
parquet through Ray Data (image cache off); one worker dies mid-epoch and the resumed attempt reads every
row of its slice exactly once, the ranks' slices are disjoint, and the λ history has no gap."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from discl_ray.config import load_config
from discl_ray.training.fixture import write_fixture
from discl_ray.training.schedules import REAL_ONLY


def stream_config(run_root, *extra):
    return load_config(None, [
        f"run_root={run_root}", "experiment=st", "dataset.image_size=16", "mining.few_max=10",
        "mining.many_min=30", "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]",
        "scoring.threshold=0.3", "training.backbone=small_cnn", "training.strategy=diverse_to_specific",
        "training.epochs=3", "training.curriculum_epochs=2", "training.cpus_per_worker=0.5",
        "training.num_workers=2", "training.batch_size=16", "training.image_cache_mb=0",
        "training.max_failures=2", "tracking.enabled=false", *extra])


@pytest.mark.slow
def test_streamed_run_killed_mid_epoch_resumes_reading_each_row_once(ray_local, run_root, tmp_path):
    from discl_ray.training import build_trainer

    cfg = stream_config(run_root)
    write_fixture(cfg)
    trace, marker = tmp_path / "trace", tmp_path / "killed.txt"
    trace.mkdir()
    trainer, selector = build_trainer(cfg, run_name="stream-kill", trace=str(trace),
                                      fault={"epoch": 1, "marker": str(marker), "rank": 1})
    try:
        result = trainer.fit()
        history = ray_local.get(selector.get_history.remote())
    finally:
        ray_local.kill(selector)
    assert result.error is None and marker.exists()
    final = result.metrics
    start = final["resumed_at_epoch"]
    assert 1 <= start <= 1 + 1                          # resumed from a checkpoint, not from scratch
    assert final["lam_history"] == [0.0, 0.5, REAL_ONLY] and [h["epoch"] for h in history] == [0, 1, 2]
    # The killed attempt never finished epoch 1 on rank 1: no trace of it.
    assert not (trace / "a0-e1-r1.json").exists()
    for epoch in range(start, 3):
        slices = [json.loads((trace / f"a{start}-e{epoch}-r{r}.json").read_text()) for r in (0, 1)]
        for s in slices:
            counts = Counter(s["read"])
            assert max(counts.values()) == 1, f"epoch {epoch}: a row was read twice"
            assert sorted(s["read"]) == sorted(s["planned"])     # exactly the rank's slice, nothing else
        assert not set(slices[0]["read"]) & set(slices[1]["read"])
        assert len(slices[0]["read"]) == len(slices[1]["read"])  # lock-step ranks
