"""What the faster epoch loop must keep: the checkpoint schedule, MLflow epochs written exactly once across
restarts (real MLflow sqlite store, no Ray), and macro-F1 on the classes of the ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from discl_ray.config import load_config
from discl_ray.data.loaders.iwildcam import macro_f1 as macro_f1_labels
from discl_ray.training.checkpointing import is_checkpoint_epoch
from discl_ray.training.loop import EpochLog
from discl_ray.training.metrics import macro_f1


def test_checkpoint_schedule_first_every_kth_and_last():
    assert [e for e in range(10) if is_checkpoint_epoch(e, 10, 1)] == list(range(10))
    assert [e for e in range(10) if is_checkpoint_epoch(e, 10, 4)] == [0, 3, 7, 9]
    assert [e for e in range(40) if is_checkpoint_epoch(e, 40, 10)] == [0, 9, 19, 29, 39]
    assert [e for e in range(3) if is_checkpoint_epoch(e, 3, 50)] == [0, 2]


def test_checkpoint_every_config():
    assert load_config(None, []).training.checkpoint_every == 1
    assert load_config(None, ["training.checkpoint_every=5"]).training.checkpoint_every == 5
    with pytest.raises(Exception, match="checkpoint_every"):
        load_config(None, ["training.checkpoint_every=0"])


def _epoch(e: int) -> dict:
    return {"epoch": e, "lam": 0.5, "train_loss": 1.0 / (e + 1), "val_acc": 0.1 * e, "n_train": 10}


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_epoch_log_writes_each_epoch_once_across_restarts(tmp_path):
    import mlflow

    from discl_ray.runtime.tracking import use_uri

    use_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    # An explicit experiment: the fluent API remembers the last test's experiment id, absent from this store.
    exp_id = client.create_experiment("epoch-log")
    with mlflow.start_run(experiment_id=exp_id) as run:
        run_id = run.info.run_id
        # Attempt 1: epochs are buffered until a checkpoint is reported, then written in one batch.
        first = EpochLog(run)
        for e in range(3):
            first.add(e, _epoch(e))
        assert _steps(client, run_id, "epoch") == []
        first.flush()
        assert _steps(client, run_id, "val_acc") == [0, 1, 2]
        # ...it reports the checkpoint of epoch 4 and dies before writing epochs 3-4.
        # Attempt 2 resumes from that checkpoint: epochs 3-4 come from the checkpoint's history.
        second = EpochLog(run, [_epoch(e) for e in range(5)])
        assert second.logged == 4 and _steps(client, run_id, "train_loss") == [0, 1, 2, 3, 4]
        for e in range(5, 8):
            second.add(e, _epoch(e))
        second.flush()
        # ...it dies after writing epoch 7 whose checkpoint Ray Train had not registered yet.
        # Attempt 3 resumes from epoch 4's checkpoint and re-runs 5-7: MLflow already has them.
        third = EpochLog(run, [_epoch(e) for e in range(5)])
        assert third.logged == 7
        for e in range(5, 10):
            third.add(e, _epoch(e))
        third.flush()
    for key in ("epoch", "lam", "train_loss", "val_acc", "n_train"):
        assert _steps(client, run_id, key) == list(range(10)), key          # no gap, no duplicate
    assert {m.step: m.value for m in client.get_metric_history(run_id, "val_acc")} == \
        pytest.approx({e: 0.1 * e for e in range(10)})


def test_epoch_log_without_tracking_is_a_no_op():
    log = EpochLog(None)
    log.add(0, _epoch(0))
    log.flush()
    assert log.run_id is None and log.pending == []


def test_macro_f1_averages_the_classes_of_the_ground_truth():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y_true = rng.integers(0, 5, 60)           # classes 5 and 6 are only ever predicted
        y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 7, 60))
        cm = np.zeros((7, 7), dtype=np.int64)
        np.add.at(cm, (y_true, y_pred), 1)
        assert macro_f1(cm) == pytest.approx(macro_f1_labels(y_true, y_pred))
    # Class 2 is never in the truth, only predicted once: averaged over classes 0 and 1 only.
    cm = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    assert macro_f1(cm) == pytest.approx((6 / 7 + 1.0) / 2)
    assert math.isnan(macro_f1(np.zeros((3, 3), dtype=np.int64)))
