"""Every loss, strategy and backbone through the real trainer (`discl train` on Ray Train), with assertions on
what it did, read back from its final metrics and from MLflow; and confidence mining (`discl mine`) with a
real classifier trained here.

The trainings run at the same time on the shared local cluster (threads of this driver, like the quickstart's
two arms; 0.5 CPU each, so Ray Data keeps a free CPU), each in its own run root and MLflow store.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reliab_fixtures import lt_experiment

REAL_ONLY = -1.0   # the λ an epoch on real data only logs (docs/architecture.md)
LQ = {"training": {"task": "low_quality", "lams": [0.5, 0.9, 1.0], "epochs": 3, "curriculum_epochs": 2,
                   "guidance_val_size": 8, "random_real_size": 16, "probe_steps": 2, "threshold": 0.2},
      "generation": {"lams": [0.5, 0.9]}}
# Real rows 20, 4, 4, 4, 4 (classes 1-4 are the tail); keeping tail : non-tail at 16 : 4 undersamples class 0
# to 4 rows in every epoch, so each epoch's class counts are uniform while the data set's are not.
BALANCED_EPOCHS = {"training": {"strategy": "none", "epochs": 2, "curriculum_epochs": 0, "keep_tail_ratio": True,
                                "tail_ratio": 4.0, "tail_ratio_stages": "all", "batch_size": 4}}
BALANCED_COUNTS = (20, 4, 4, 4, 4)
LONG_TAIL = {"training": {"strategy": "none", "epochs": 2, "curriculum_epochs": 0, "keep_tail_ratio": False,
                          "batch_size": 20}}


def _clip_over(tmp_path) -> dict:
    from clip_fixtures import TINY_CLIP, make_tiny_clip

    json_path, weights = make_tiny_clip(tmp_path / "clip")
    return {"scoring": {"model": TINY_CLIP, "model_config_path": str(json_path), "pretrained": str(weights)},
            "training": {"backbone": "clip", "loss": "flyp", "wise_alphas": [0.0, 0.5, 1.0],
                         "strategy": "easy_to_hard", "epochs": 2, "curriculum_epochs": 1, "lr": 0.0005,
                         "batch_size": 16, "lams": [0.5, 0.9, 1.0], "threshold": 0.2, "task": "low_quality"},
            "generation": {"lams": [0.5, 0.9]}}


def _train(name: str, path, argv: list[str]) -> dict:
    from jobs.train import main

    out = path.parent / f"{name}.json"
    rc = main(["--config", str(path), "--run-name", name, "--json", str(out), *argv])
    assert rc == 0, name
    return json.loads(out.read_text())


def _history(data: dict, key: str) -> list[float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=data["tracking"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(data["experiment"]).experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """name -> (final metrics, config data) of each training, run three at a time."""
    def lt(name, over, **fixture):
        return lt_experiment(tmp_path_factory.mktemp(name), over, **fixture)

    clip_dir = tmp_path_factory.mktemp("clip")
    specs = {
        "bs_bal": lt("bs_bal", {"training": BALANCED_EPOCHS["training"] | {"loss": "balanced_softmax"}},
                     train_counts=BALANCED_COUNTS),
        "ce_bal": lt("ce_bal", BALANCED_EPOCHS, train_counts=BALANCED_COUNTS),
        "bs": lt("bs", {"training": LONG_TAIL["training"] | {"loss": "balanced_softmax"}}),
        "ce": lt("ce", {"training": LONG_TAIL["training"] | {"epochs": 1}}),
        "adaptive": lt("adaptive", LQ | {"training": LQ["training"] | {"strategy": "adaptive"}},
                       low_quality=True, train_counts=(12, 12, 12)),
        "flyp": lt("flyp", _clip_over(clip_dir), low_quality=True, train_counts=(10, 10, 10)),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_train, name, path, []) for name, (path, _) in specs.items()}
        return {name: (fut.result(), specs[name][1]) for name, fut in futures.items()}


def test_balanced_softmax_prior_is_the_epochs_class_counts(runs):
    """Balanced Softmax adds log p (the class prior) to the logits. When every epoch's class counts are
    uniform, log p is a constant and the loss is exactly cross-entropy: same seed, same batches, the same loss
    in every epoch. A prior taken from anything else (here the data set's 20 : 4 : 4 : 4 : 4) would differ."""
    (bs, bs_data), (ce, ce_data) = runs["bs_bal"], runs["ce_bal"]
    assert _history(bs_data, "n_train") == _history(ce_data, "n_train") == [20, 20]   # 4 rows of each class
    assert _history(bs_data, "train_loss") == pytest.approx(_history(ce_data, "train_loss"), rel=1e-4)
    assert bs["best_val_acc"] == pytest.approx(ce["best_val_acc"], abs=1e-6)


def test_balanced_softmax_on_a_long_tail_differs_from_ce_and_decreases(runs):
    (bs, bs_data), (_, ce_data) = runs["bs"], runs["ce"]
    losses, ce_losses = _history(bs_data, "train_loss"), _history(ce_data, "train_loss")
    assert _history(bs_data, "n_train") == [sum((40, 30, 20, 6, 4))] * 2
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    # Same seed, same batches: at the first epoch the only difference is the prior's log(40, 30, 20, 6, 4).
    assert abs(losses[0] - ce_losses[0]) > 0.05, (losses, ce_losses)
    assert bs["lam_history"] == [REAL_ONLY] * 2
    assert 0 <= bs["final_test_few_acc"] <= 1


def test_adaptive_picks_the_argmax_of_its_logged_gains(runs):
    final, data = runs["adaptive"]
    lams = _history(data, "lam")
    assert lams == final["lam_history"] and len(lams) == 3 and lams[2] == REAL_ONLY
    for epoch in (0, 1):
        gains = {lam: _history(data, f"gain_lam_{lam}")[epoch] for lam in (0.5, 0.9, 1.0)}
        finite = {k: v for k, v in gains.items() if math.isfinite(v)}
        best = max(sorted(finite), key=lambda k: finite[k])               # ties: the lowest λ
        assert lams[epoch] == best, (epoch, gains, lams)
    for lam in (0.5, 0.9, 1.0):
        assert len(_history(data, f"gain_lam_{lam}")) == 2               # probed in curriculum epochs only
    assert final["select_metric"] == "val_f1"
    assert 0 <= final["final_test_id_f1"] <= 1 and 0 <= final["final_test_ood_f1"] <= 1


def test_flyp_with_wise_ft_reports_every_alpha(runs):
    final, data = runs["flyp"]
    assert final["lam_history"] == [0.5, REAL_ONLY]                      # easy→hard starts at the lowest λ kept
    for alpha in ("0.0", "0.5", "1.0"):                                 # every α scored on ID validation
        assert 0 <= final[f"final_wise_val_{alpha}"] <= 1
    for split in ("test_id", "test_ood"):                               # test only for the chosen α
        assert 0 <= final[f"final_wise_{split}_f1"] <= 1
        assert not any(k.startswith("final_wise_") and k.endswith(f"_{split}_f1") and k != f"final_wise_{split}_f1"
                       for k in final)
    # α = 1 is the fine-tuned model selected on validation: its validation score is the best epoch's, whichever α
    # wins (checked every run, not only when α = 1 happens to be chosen)
    assert final["final_wise_val_1.0"] == pytest.approx(final["best_val_f1"])
    if float(final["wise_alpha"]) == 1.0:
        assert final["final_wise_test_id_f1"] == pytest.approx(final["final_test_id_f1"])
    assert len(_history(data, "train_loss")) == 2 and all(math.isfinite(v) for v in _history(data, "train_loss"))


def test_wise_ft_alpha_is_chosen_on_validation(runs):
    final, _ = runs["flyp"]
    per_alpha = {float(a): final[f"final_wise_val_{a}"] for a in ("0.0", "0.5", "1.0")}
    # the best validation score; ties go to the larger α (closer to the model selected on validation)
    assert float(final["wise_alpha"]) == max(sorted(per_alpha, reverse=True), key=lambda a: per_alpha[a])
    assert final[f"wise_best_{final['select_metric']}"] == per_alpha[float(final["wise_alpha"])]


def test_confidence_mining_with_a_real_classifier(tmp_path, capsys):
    """`discl mine` with a TorchScript classifier trained here on the clean rows: the mined rows are each
    class's least confident ones under that classifier, and mostly the noisy third of every class."""
    import pyarrow.compute as pc
    import torch

    from discl_ray.config import load_config
    from discl_ray.data import read_rows
    from discl_ray.runtime.io import load_image, read_parquet_dir
    from jobs.mine import main

    path, _ = lt_experiment(tmp_path, {"training": {"task": "low_quality"}}, low_quality=True,
                            train_counts=(15, 15, 15))
    train = read_rows(load_config(path), ("train",))
    x = torch.stack([torch.from_numpy(np.asarray(load_image(b), np.float32) / 255.0).permute(2, 0, 1)
                     for b in train["image"].to_pylist()])
    y = torch.tensor(train["label"].to_pylist())
    noisy = np.array([int(i.rsplit("-", 1)[1]) % 3 == 0 for i in train["image_id"].to_pylist()])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    clean = torch.from_numpy(~noisy)
    for _ in range(150):                                                  # a linear probe on the clean rows
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[clean]), y[clean]).backward()
        opt.step()
    scripted = tmp_path / "judge.pt"
    torch.jit.script(net.eval()).save(str(scripted))
    assert main(["--config", str(path), "mining.mode=confidence", "mining.classifier=torchscript",
                 f"mining.classifier_path={scripted}", "mining.lowest_k=3"]) == 0
    assert "hard samples: 9 of 45 training images (confidence)" in capsys.readouterr().out
    hard = read_parquet_dir(tmp_path / "runs" / "fx" / "mine")
    with torch.no_grad():
        prob = torch.softmax(net(x), -1)[torch.arange(len(y)), y].numpy()
    ids = train["image_id"].to_pylist()
    want = sorted(ids[i] for c in range(3) for i in np.flatnonzero(y.numpy() == c)[np.argsort(prob[y.numpy() == c],
                                                                                             kind="stable")[:3]])
    assert sorted(hard["image_id"].to_pylist()) == want
    scores = dict(zip(hard["image_id"].to_pylist(), hard["score"].to_pylist()))
    assert all(scores[i] == pytest.approx(float(prob[ids.index(i)]), abs=1e-5) for i in scores)
    assert set(hard["reason"].to_pylist()) == {"confidence"}
    assert pc.sum(pc.is_in(hard["image_id"], pa_ids([i for i, n in zip(ids, noisy) if n]))).as_py() >= 6


def pa_ids(values):
    import pyarrow as pa

    return pa.array(values, pa.string())
