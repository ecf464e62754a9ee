"""iWildCam as the paper ran it, on tiny local CLIPs: the trainer's own backbone, common-name captions, LP-FT,
WiSE-FT α on validation with "+ WE" report rows, and hard sets mined by the trained baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from clip_fixtures import TINY_CLIP_CONFIG, make_tiny_clip

from discl_ray.config import load_config
from discl_ray.training import checkpointing as ckpt
from discl_ray.training.clip_backbone import caption_prompts, trainer_clip_config
from discl_ray.training.models import ClipClassifier, build_model

REPO = Path(__file__).resolve().parents[1]


def _wider_clip(tmp: Path) -> Path:
    """A second tiny architecture (wider image tower): the trainer's model, unlike the filter's."""
    arch = json.loads(json.dumps(TINY_CLIP_CONFIG))
    arch["vision_cfg"]["width"] = 48
    path = tmp / "tiny-clip-wide.json"
    path.write_text(json.dumps(arch))
    return path


def _cfg(tmp: Path, *over):
    json_path, weights = make_tiny_clip(tmp / "clip")
    return load_config(REPO / "configs/iwildcam/discl_adaptive.yaml", [
        f"run_root={tmp / 'runs'}", "scoring.model=tiny-clip", f"scoring.model_config_path={json_path}",
        f"scoring.pretrained={weights}", "scoring.device=cpu", "training.clip.model=tiny-clip-wide",
        f"training.clip.model_config_path={_wider_clip(tmp)}", "training.clip.pretrained=null", *over])


def test_trainer_clip_is_not_the_filter_and_captions_use_common_names(tmp_path):
    shipped = load_config(REPO / "configs/iwildcam/baseline_flyp.yaml")
    assert trainer_clip_config(shipped).model == "ViT-B-16" and shipped.scoring.model == "ViT-B-32"
    caps = caption_prompts(shipped, ["tayassu pecari", "empty"])
    assert caps == ["a photo of white-lipped peccary in the wild", "a photo of empty scene in the wild"]
    cfg = _cfg(tmp_path)
    net = build_model("clip", 2, cfg=cfg, prompts=caption_prompts(cfg, ["tayassu pecari", "empty"]))
    assert isinstance(net, ClipClassifier) and net.clip.visual.conv1.out_channels == 48   # trainer's arch
    from discl_ray.models.clip import load_clip
    from discl_ray.runtime.cluster import RunPaths

    filt, _, _ = load_clip(cfg.scoring, RunPaths.from_config(cfg).cache)
    assert filt.visual.conv1.out_channels == 32                                            # the filter's arch
    # The zero-shot head encodes exactly the common-name captions.
    import open_clip

    tok = open_clip.get_tokenizer("tiny-clip-wide")(["a photo of white-lipped peccary in the wild"])
    assert torch.equal(net.class_tokens[0], tok[0])


def test_lp_ft_head_starts_zero_shot_and_probes_only_the_head(tmp_path):
    from discl_ray.training.lpft import LinearHeadClip, drop_encoder_grads, epoch_lr

    cfg = _cfg(tmp_path, "training.head=linear", "training.loss=ce", "training.lp_epochs=1", "training.lp_lr=0.01",
               "training.strategy=none")
    torch.manual_seed(0)
    zs = build_model("clip", 3, cfg=cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"head": "zero_shot"})}), prompts=["a", "b", "c"])
    torch.manual_seed(0)
    net = build_model("clip", 3, cfg=cfg, prompts=["a", "b", "c"])
    assert isinstance(net, LinearHeadClip) and not any(n.startswith("transformer") for n, _ in net.named_parameters())
    # The input pipeline of the trainer (loop.py: build_pipeline(cfg, getattr(net, "clip", None))) finds the
    # model's preprocess on the LP-FT model as on the zero-shot one (it once raised "needs the open_clip model").
    from discl_ray.training.transforms import build_pipeline

    lp_pipe, zs_pipe = build_pipeline(cfg, getattr(net, "clip", None)), build_pipeline(cfg, zs.clip)
    assert lp_pipe.kind == zs_pipe.kind == "clip"
    assert vars(lp_pipe) == vars(zs_pipe)
    x = torch.rand(4, 3, 16, 16)
    zs.eval(), net.eval()
    assert torch.allclose(net(x), zs(x), atol=1e-5)          # epoch 0 = the zero-shot classifier
    assert epoch_lr(cfg.training, 0, 1e-5) == 0.01 and epoch_lr(cfg.training, 1, 1e-5) == 1e-5
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    for epoch in (0, 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 0])).backward()
        drop_encoder_grads(net, cfg.training, epoch)
        opt.step()
        changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
        if epoch == 0:
            assert changed == {"head.weight", "head.bias"}     # linear probing: encoder untouched, no decay
        else:
            assert any(k.startswith("visual.") for k in changed)   # then full fine-tuning


def test_wise_alpha_is_chosen_on_validation_only():
    from discl_ray.config import TrainingConfig
    from discl_ray.training.wise import wise_on_validation

    tc = TrainingConfig(task="low_quality", backbone="clip", loss="flyp", wise_alphas=[0.25, 0.5, 0.75],
                        select_metric="val_f1")
    zero, tuned = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        zero.weight.fill_(0.0), tuned.weight.fill_(1.0)
    calls = []

    def evaluate(split, model):
        w = float(model.weight.detach().mean())        # = α: validation peaks at α = 0.5, test would prefer α = 0.75
        calls.append((split, w))
        score = 1 - abs(w - 0.5) if split == "val" else w
        return {f"{split}_f1": score}, None

    out = wise_on_validation(evaluate, tc, zero.state_dict(), zero, tuned.state_dict(), has_ood=True)
    assert out["wise_alpha"] == 0.5 and out["final_wise_test_id_f1"] == pytest.approx(0.5)
    assert out["final_wise_test_ood_f1"] == pytest.approx(0.5)
    assert [s for s, _ in calls].count("val") == 3
    assert {round(w, 3) for s, w in calls if s != "val"} == {0.5}      # test splits saw the chosen α only


def test_report_adds_a_we_row_per_configuration():
    from discl_ray.report.tables import aggregate, format_table

    rows = []
    for strategy, wise in (("none", True), ("adaptive", True), ("easy_to_hard", False)):
        for seed in range(2):
            r = {"params.training.strategy": strategy, "params.training.seed": str(seed),
                 "metrics.final_test_ood_f1": 0.30 + 0.02 * seed, "metrics.final_test_id_f1": 0.50 + 0.02 * seed}
            if wise:
                r.update({"metrics.final_wise_test_ood_f1": 0.40 + 0.02 * seed,
                          "metrics.final_wise_test_id_f1": 0.60})
            rows.append(r)
    df = aggregate(pd.DataFrame(rows), "low_quality")
    assert list(df["we"]) == ["", "+ WE", "", "", "+ WE"]
    assert list(df["training.strategy"]) == ["adaptive", "adaptive", "easy_to_hard", "none", "none"]
    we = df[df["we"] == "+ WE"].iloc[0]
    assert we["ood_f1_mean"] == pytest.approx(0.41) and we["id_f1_mean"] == pytest.approx(0.60) and we["n"] == 2
    assert "+ WE" in format_table(df, "low_quality")["we"].tolist()


def test_select_hard_sizes_and_exclusions():
    from discl_ray.config import MiningConfig
    from discl_ray.mining.hard_set import select_hard

    labels = [0] * 5 + [1] * 5 + [2] * 5
    prob = [0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.15, 0.9, 0.9, 0.9, 0.01, 0.02, 0.03, 0.04, 0.05]
    names = ["a"] * 5 + ["b"] * 5 + ["empty"] * 5
    m = dict(mode="confidence", exclude_classes=["empty"])
    assert select_hard(labels, prob, names, MiningConfig(**m, target_count=3)).tolist() == [0, 5, 6]
    q = select_hard(labels, prob, names, MiningConfig(**m, class_quantile=0.4)).tolist()
    assert q == [0, 1, 5, 6]
    assert select_hard(labels, prob, names, MiningConfig(**m, threshold=0.16)).tolist() == [0, 5, 6]
    assert select_hard(labels, prob, names, MiningConfig(mode="confidence", lowest_k=1)).tolist() == [0, 5, 10]
    with pytest.raises(Exception, match="exactly one of"):
        MiningConfig(mode="confidence", target_count=3, threshold=0.2)


def test_discl_mine_with_the_trained_baseline(tmp_path, capsys):
    """`discl mine` on the toy world's low-quality digits, scored by a finished 'baseline' run's CLIP."""
    from jobs.mine import main

    over = ["dataset.name=digits_lq", "dataset.root=null", "dataset.image_size=16", "training.image_size=16",
            "experiment=lq", "mining.classifier_from=lq_flyp", "mining.target_count=25",
            "mining.exclude_classes=[zero]", "prompts.name_map=null", "prompts.template=a photo of the digit {name}",
            "prompts.clip_template=a photo of the digit {name}"]
    cfg = _cfg(tmp_path, *over)
    from discl_ray.data import class_names, read_rows
    from discl_ray.mining.select import trained_run_probs

    names = class_names(read_rows(cfg))
    torch.manual_seed(3)
    net = build_model("clip", len(names), cfg=cfg, prompts=caption_prompts(cfg, [names[c] for c in sorted(names)]))
    c = ckpt.save(net, None, epoch=0, best={"value": 0.1, "epoch": 0}, best_model=ckpt.cpu_state(net),
                  final={"best_epoch": 0})
    shutil.copytree(c.path, tmp_path / "runs" / "lq_flyp" / "train" / "flyp" / "checkpoint_2026-01-01_00-00-00.0")
    ckpt.cleanup(c)
    args = ["--config", str(REPO / "configs/iwildcam/discl_adaptive.yaml")] + [
        f"run_root={tmp_path / 'runs'}", f"scoring.model_config_path={cfg.scoring.model_config_path}",
        "scoring.model=tiny-clip", f"scoring.pretrained={cfg.scoring.pretrained}", "scoring.device=cpu",
        "training.clip.model=tiny-clip-wide", f"training.clip.model_config_path={cfg.training.clip.model_config_path}",
        "training.clip.pretrained=null", *over]
    assert main(args) == 0
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import read_parquet_dir

    hard = read_parquet_dir(RunPaths.from_config(cfg).stage("mine"))
    assert hard.num_rows == 25 and "zero" not in hard["class_name"].to_pylist()
    train = read_rows(cfg, ("train",))
    probs = trained_run_probs(cfg, train, "cpu")
    eligible = np.array([n != "zero" for n in train["class_name"].to_pylist()])
    cutoff = np.sort(probs[eligible])[24]
    assert max(hard["score"].to_pylist()) == pytest.approx(cutoff)             # the 25 least confident
    wrong = _cfg(tmp_path, *over, "training.clip.model=tiny-clip", "training.clip.model_config_path="
                 f"{cfg.scoring.model_config_path}")
    with pytest.raises(ValueError, match="does not fit"):
        trained_run_probs(wrong, train, "cpu")


@pytest.mark.slow
def test_lp_ft_with_wise_on_ray_train(tmp_path, ray_private):
    """LP-FT + WE end to end on Ray Train: the trainer's own tiny CLIP, head-only epoch, α chosen on val."""
    from discl_ray.training import fit
    from discl_ray.training.fixture import write_fixture

    cfg = load_config(None, [
        f"run_root={tmp_path / 'runs'}", "experiment=lpft", "dataset.image_size=16", "generation.lams=[0.5,0.9]",
        "training.lams=[0.5,0.9,1.0]", "scoring.model=tiny-clip",
        f"scoring.model_config_path={make_tiny_clip(tmp_path / 'clip')[0]}", "scoring.pretrained=null",
        "training.backbone=clip", "training.clip.model=tiny-clip-wide",
        f"training.clip.model_config_path={_wider_clip(tmp_path)}", "training.head=linear", "training.loss=ce",
        "training.lp_epochs=1", "training.lp_lr=0.01", "training.wise_alphas=[0.5,1.0]",
        "training.task=low_quality", "training.strategy=none", "training.epochs=2", "training.curriculum_epochs=0",
        "training.cpus_per_worker=0.5", "training.batch_size=16", "training.lr=0.0005", "tracking.enabled=false"])
    write_fixture(cfg, low_quality=True, train_counts=(10, 10, 10))
    final = fit(cfg, run_name="lpft-we")
    assert final["wise_alpha"] in (0.5, 1.0)
    chosen = final[f"final_wise_val_{final['wise_alpha']}"]
    assert chosen == max(final["final_wise_val_0.5"], final["final_wise_val_1.0"])
    # α = 1 is the fine-tuned model itself: its val F1 is the best epoch's, whichever α wins
    assert final["final_wise_val_1.0"] == pytest.approx(final["best_val_f1"])
    assert final["wise_best_val_f1"] == chosen
    if final["wise_alpha"] == 1.0:      # the WE row is then the fine-tuned model's test row
        assert (final["final_wise_test_id_f1"], final["final_wise_test_ood_f1"]) == pytest.approx(
            (final["final_test_id_f1"], final["final_test_ood_f1"]))
    # a head-only epoch, then fine-tuning, on a model that learned something (chance is 1/3 on 3 classes)
    assert final["best_val_f1"] > 0.34 and final["lam_history"] == [-1.0, -1.0]
