"""The shipped real-dataset configs validate and carry the paper's settings (Table 6, Table 8, A.1–A.3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from discl_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("imagenet_lt", "cifar100_lt", "inat2018", "iwildcam")
ROOTS = {"imagenet_lt": "data/imagenet_lt", "cifar100_lt": "data/cifar100", "inat2018": "data/inat2018",
         "iwildcam": "data/wilds"}
FILES = sorted(p for f in FOLDERS for p in (REPO / "configs" / f).glob("*.yaml"))


def test_every_folder_has_configs():
    for folder in FOLDERS:
        names = {p.name for p in FILES if p.parent.name == folder}
        assert "base.yaml" in names and any(n.startswith("sweep_") for n in names), folder
        assert any(n.startswith("baseline_") for n in names) and any(n.startswith("discl_") for n in names), folder


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.dataset.name == path.parent.name
    assert cfg.dataset.root == ROOTS[path.parent.name]  # relative placeholders, never machine paths
    assert cfg.generation.model == "stabilityai/stable-diffusion-xl-refiner-1.0"
    assert cfg.generation.scheduler == "ddim" and cfg.generation.guidance_scale == 10.0
    assert (cfg.scoring.model, cfg.scoring.pretrained) == ("ViT-B-32", "openai")
    assert len(cfg.generation.seeds) == (4 if path.parent.name == "inat2018" else 8)
    assert cfg.training.seed in (0, 1, 2)
    if cfg.sweep.space:
        assert path.name.startswith("sweep_")
    lt = cfg.training.task == "long_tail"
    if path.name.startswith("baseline_") or cfg.dataset.name == "iwildcam":
        assert cfg.training.init_from is None               # baselines (and CLIP runs) start from pretrained weights
    elif lt:                                                # Algorithm 1: DisCL fine-tunes the CE baseline
        assert cfg.training.init_from and cfg.training.init_from.endswith("_ce"), path
    if cfg.dataset.name == "iwildcam":
        assert cfg.training.clip.model in ("ViT-B-16", "ViT-L-14") and cfg.training.clip.model != cfg.scoring.model


def test_paper_values():
    inlt = load_config(REPO / "configs/imagenet_lt/discl_d2s.yaml")
    assert inlt.training.lams == [0.0, 0.1, 0.3, 0.5, 1.0] and inlt.scoring.threshold == 0.30
    assert (inlt.training.backbone, inlt.training.optimizer, inlt.training.lr, inlt.training.lr_schedule,
            inlt.training.batch_size, inlt.training.epochs, inlt.training.curriculum_epochs) == (
        "resnet10", "adam", 1e-3, "cosine", 128, 65, 60)
    assert inlt.training.tail_ratio == 0.136 and inlt.mining.few_max == 20 and inlt.mining.many_min == 101
    assert (inlt.training.tail_ratio_stages, inlt.training.tail_ratio_rule) == ("curriculum", "paper")
    wild = load_config(REPO / "configs/iwildcam/discl_adaptive.yaml")
    assert wild.training.lams == [0.5, 0.7, 0.9, 1.0] and wild.scoring.threshold == 0.25
    assert (wild.training.strategy, wild.training.loss, wild.training.backbone, wild.training.optimizer,
            wild.training.lr, wild.training.batch_size, wild.training.epochs, wild.training.curriculum_epochs,
            wild.training.random_real_size, wild.training.guidance_val_size) == (
        "adaptive", "flyp", "clip", "adamw", 1e-5, 256, 20, 15, 30000, 2000)
    assert wild.prompts.template == "a photo of {name} in the wild"
    assert (REPO / wild.prompts.name_map).is_file()
    assert load_config(REPO / "configs/cifar100_lt/discl_d2s_r50.yaml").dataset.imbalance_ratio == 50
    assert load_config(REPO / "configs/cifar100_lt/discl_d2s_r100.yaml").dataset.imbalance_ratio == 100
    assert load_config(REPO / "configs/cifar100_lt/base.yaml").training.lams == [0.5, 0.7, 0.9, 1.0]
    # Issue 14: the paper's experiment as the paper ran it.
    assert (wild.training.clip.model, wild.training.clip.pretrained) == ("ViT-B-16", "openai")
    assert (wild.mining.classifier, wild.mining.classifier_from, wild.mining.target_count) == (
        "trained_run", "iwildcam_flyp", 8260) and wild.mining.exclude_classes == ["empty"]
    large = load_config(REPO / "configs/iwildcam/discl_adaptive_vitl14.yaml")
    assert (large.training.clip.model, large.training.batch_size) == ("ViT-L-14", 200)
