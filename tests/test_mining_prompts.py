"""Hard-sample mining (both modes on crafted data) and prompt tables."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from discl_ray.config import MiningConfig, PromptsConfig
from discl_ray.mining.select import class_groups, mine_confidence, mine_frequency, select_low_confidence
from discl_ray.prompts.templates import build_prompts


def _train(counts: dict[int, int]) -> pa.Table:
    ids, labels = [], []
    for c, n in counts.items():
        for i in range(n):
            ids.append(f"c{c}-{i}")
            labels.append(c)
    return pa.table({"image_id": ids, "label": labels, "class_name": [f"n{c}" for c in labels]})


def test_class_groups_paper_thresholds():
    labels = [0] * 150 + [1] * 100 + [2] * 99 + [3] * 20 + [4] * 19 + [5] * 1
    assert class_groups(labels) == {0: "many", 1: "medium", 2: "medium", 3: "medium", 4: "few", 5: "few"}


def test_frequency_mining_takes_tail_classes():
    train = _train({0: 30, 1: 12, 2: 4, 3: 2})
    hard = mine_frequency(train, MiningConfig(few_max=10, many_min=20, hard_groups=["few"]))
    assert sorted(set(hard["label"].to_pylist())) == [2, 3]
    assert hard.num_rows == 6
    assert set(hard["group"].to_pylist()) == {"few"} and set(hard["reason"].to_pylist()) == {"frequency"}
    assert all(math.isnan(v) for v in hard["score"].to_pylist())
    both = mine_frequency(train, MiningConfig(few_max=10, many_min=20, hard_groups=["few", "medium"]))
    assert both.num_rows == 18


def test_confidence_mining_threshold_and_lowest_k():
    train = _train({0: 4, 1: 4})
    probs = [0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.05, 0.3]
    hard = mine_confidence(train, MiningConfig(mode="confidence", threshold=0.25), probs)
    assert hard["image_id"].to_pylist() == ["c0-1", "c0-3", "c1-2"]
    assert hard["score"].to_pylist() == [0.1, 0.2, 0.05]
    k = mine_confidence(train, MiningConfig(mode="confidence", lowest_k=2), probs)
    assert k["image_id"].to_pylist() == ["c0-1", "c0-3", "c1-0", "c1-2"]
    # ties broken by row order: c1-0 (0.3) precedes c1-3 (0.3)
    assert select_low_confidence([0, 0, 0], [0.3, 0.3, 0.3], lowest_k=2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        select_low_confidence([0], [0.1])


def test_prompts_templates_name_map_and_lists(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"Panthera leo": "lion"}))
    (tmp_path / "lists.json").write_text(json.dumps({"Panthera leo": ["a lion resting on a rock at dusk"]}))
    cfg = PromptsConfig(template="a photo of {name} in the wild", clip_template="a photo of {name}",
                        name_map=str(tmp_path / "names.json"), prompts_file=str(tmp_path / "lists.json"))
    t = build_prompts({0: "Panthera leo", 1: "Bos taurus"}, cfg).to_pylist()
    assert t[0]["display_name"] == "lion" and t[0]["clip_prompt"] == "a photo of lion"
    assert t[0]["gen_prompts"] == ["a photo of lion in the wild", "a lion resting on a rock at dusk"]
    assert t[1]["display_name"] == "Bos taurus" and t[1]["gen_prompts"] == ["a photo of Bos taurus in the wild"]


def test_prompts_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_map"):
        build_prompts({0: "a"}, PromptsConfig(name_map=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_prompts({0: "a"}, PromptsConfig(prompts_file=str(tmp_path / "bad.json")))
    (tmp_path / "nolist.json").write_text(json.dumps({"b": ["x"]}))
    with pytest.raises(ValueError, match="no generation prompt"):
        build_prompts({0: "a"}, PromptsConfig(prompts_file=str(tmp_path / "nolist.json"), include_template=False))


def test_confidence_mining_runs_as_a_ray_data_stage(tmp_path, ray_local):
    """true_class_probs: the classifier runs in Ray Data actors (device resolved there), rows keep their order."""
    import numpy as np
    import torch

    from discl_ray.config import load_config
    from discl_ray.mining.select import true_class_probs
    from discl_ray.runtime.io import png_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    file = tmp_path / "judge.pt"
    torch.jit.script(net).save(str(file))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(7)]
    labels = [i % 3 for i in range(7)]
    train = pa.table({"image_id": [f"i{i}" for i in range(7)], "image": [png_bytes(x) for x in imgs],
                      "path": pa.nulls(7, pa.string()), "label": labels, "class_name": [f"n{c}" for c in labels]})
    cfg = load_config(data={"run_root": str(tmp_path / "runs"), "dataset": {"image_size": 8},
                            "mining": {"mode": "confidence", "classifier": "torchscript",
                                       "classifier_path": str(file), "lowest_k": 1, "batch_size": 3},
                            "scoring": {"device": "auto"}, "tracking": {"enabled": False}})
    actors: list = []
    probs = true_class_probs(cfg, train, actors=actors)
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in imgs])
    want = torch.softmax(net(x), -1)[torch.arange(7), torch.tensor(labels)].detach().numpy()
    assert np.allclose(probs, want, atol=1e-6)
    assert actors and all(a["device"] == "cpu" and a["resources"].get("GPU", 0) == 0 for a in actors)


def test_confidence_mining_shares_the_rows_among_the_pool(tmp_path, ray_local):
    """With a pool of two actors both score rows: the table goes to Ray Data as several blocks (one block, as
    ``from_arrow(table)`` makes it, is one actor's work; the other would sit idle)."""
    import numpy as np
    import torch
    from ray.data import DataContext

    from discl_ray.config import load_config
    from discl_ray.mining.select import split_blocks, true_class_probs
    from discl_ray.runtime.io import png_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    file = tmp_path / "judge.pt"
    torch.jit.script(net).save(str(file))
    rng = np.random.default_rng(1)
    n = 24
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    labels = [i % 3 for i in range(n)]
    train = pa.table({"image_id": [f"i{i}" for i in range(n)], "image": [png_bytes(x) for x in imgs],
                      "path": pa.nulls(n, pa.string()), "label": labels, "class_name": [f"n{c}" for c in labels]})
    assert [b.num_rows for b in split_blocks(train, 3, 2)] == [3] * 8
    assert [b.num_rows for b in split_blocks(train, 64, 2)] == [24]      # fewer rows than a batch: one block
    cfg = load_config(data={"run_root": str(tmp_path / "runs"), "dataset": {"image_size": 8},
                            "mining": {"mode": "confidence", "classifier": "torchscript",
                                       "classifier_path": str(file), "lowest_k": 1, "batch_size": 3},
                            "scoring": {"device": "cpu", "actors_max": 2, "num_cpus_per_actor": 0.5},
                            "tracking": {"enabled": False}})
    # Both actors up before the first block is handed out, so the split (not start-up timing) decides.
    ctx = DataContext.get_current()
    before = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = 120
    try:
        actors: list = []
        probs = true_class_probs(cfg, train, actors=actors)
    finally:
        ctx.wait_for_min_actors_s = before
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in imgs])
    want = torch.softmax(net(x), -1)[torch.arange(n), torch.tensor(labels)].detach().numpy()
    assert np.allclose(probs, want, atol=1e-6)                         # every row once, in the table's order
    assert len({a["actor_id"] for a in actors}) == 2, actors
