"""The iWildCam FLYP baseline as FLYP's own code trains it (locuslab/FLYP; ``discl_ray/training/flyp.py``):
its two captions per image drawn by its persistent, reshuffled pair loader (``datacreation_scripts/iwildcam.py``,
``src/models/flyp_loss.py``), and its cosine learning rate set before every optimizer step with its warm-up
(``src/models/utils.py`` ``cosine_lr``). The references below transcribe FLYP's loops; only the shuffle's random
numbers are shared with the implementation (a seeded permutation per pass instead of torch's RandomSampler)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from discl_ray.config import load_config
from discl_ray.training import flyp
from discl_ray.training.fixture import write_fixture

REPO = Path(__file__).resolve().parents[1]
# FLYP's src/templates/iwildcam_template.py (also datacreation_scripts/iwildcam.py)
FLYP_IWILDCAM_TEMPLATE = [lambda c: f"a photo of {c}.", lambda c: f"{c} in the wild."]


class _PassSampler(torch.utils.data.Sampler):
    """RandomSampler's role in FLYP's caption loader: a new order each time the loader is iterated."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.passes = n, seed, 0

    def __iter__(self):
        perm = flyp.pass_permutation(self.seed, self.n, self.passes)
        self.passes += 1
        return iter(perm.tolist())

    def __len__(self):
        return self.n


def flyp_reference_epochs(n_images: int, batch: int, epochs: int, seed: int) -> list[list[list[tuple]]]:
    """FLYP's training loop over its iWildCam caption file, transcribed: the file is the first-template rows
    then the second-template rows; ``num_batches = len(dataset.train_loader)`` (the image loader); one
    ``ft_iterator`` over a shuffled ``drop_last=False`` loader, re-created on StopIteration. Returns per epoch
    the batches as (image, template) pairs."""
    csv = [(i, 0) for i in range(n_images)] + [(i, 1) for i in range(n_images)]       # pd.concat((df1, df2))
    ft_dataloader = torch.utils.data.DataLoader(csv, batch_size=batch, sampler=_PassSampler(len(csv), seed),
                                                drop_last=False, collate_fn=list)
    num_batches = len(torch.utils.data.DataLoader(range(n_images), batch_size=batch))
    ft_iterator = iter(ft_dataloader)
    out = []
    for _epoch in range(epochs):
        batches = []
        for _i in range(num_batches):
            try:
                ft_batch = next(ft_iterator)
            except StopIteration:
                ft_iterator = iter(ft_dataloader)
                ft_batch = next(ft_iterator)
            batches.append(ft_batch)
        out.append(batches)
    return out


def flyp_reference_lrs(base_lr: float, warmup_length: int, epochs: int, num_batches: int) -> list[float]:
    """FLYP's ``cosine_lr`` as its loop calls it (``scheduler(step)`` before each step), read off the optimizer."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr, weight_decay=0.2)
    steps, min_lr = epochs * num_batches, 0.0

    def _lr_adjuster(step):
        for param_group in opt.param_groups:
            if step < warmup_length:
                lr = base_lr * (step + 1) / warmup_length
            else:
                e = step - warmup_length
                es = steps - warmup_length
                lr = 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr + min_lr
            param_group["lr"] = lr

    lrs = []
    for epoch in range(epochs):
        for i in range(num_batches):
            _lr_adjuster(i + epoch * num_batches)
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("n_images,batch", [(21, 4), (24, 4), (7, 8)])
def test_pairs_are_drawn_as_flyps_persistent_loader_draws_them(n_images, batch):
    """Epoch by epoch, the same (image, caption) batches as FLYP's loop, including the short last batch of a
    pass and the reshuffle in the middle of an epoch; each pass holds every pair once."""
    epochs, seed = 7, 3
    ref = flyp_reference_epochs(n_images, batch, epochs, seed)
    for epoch in range(epochs):
        got = flyp.epoch_pair_batches(n_images, 2, batch, epoch, seed)
        assert len(got) == math.ceil(n_images / batch) == len(ref[epoch])     # FLYP's num_batches
        assert [[(int(q) % n_images, int(q) // n_images) for q in g] for g in got] == ref[epoch], epoch
    stream = [p for e in range(epochs) for g in flyp.epoch_pair_batches(n_images, 2, batch, e, seed) for p in g]
    first_pass = stream[:2 * n_images]
    assert sorted(first_pass) == list(range(2 * n_images))                  # every pair once per pass
    # caption ids: template-major over the classes (flyp.caption_texts)
    labels = np.arange(n_images) % 3
    pairs = np.arange(2 * n_images)
    ids = flyp.caption_ids(pairs, n_images, labels[pairs % n_images], 3)
    texts = flyp.caption_texts(["a photo of {name}.", "{name} in the wild."], ["A", "B", "C"])
    assert [texts[i] for i in ids[:3]] == ["a photo of A.", "a photo of B.", "a photo of C."]
    assert [texts[i] for i in ids[n_images:n_images + 2]] == ["A in the wild.", "B in the wild."]


def test_lr_is_flyps_cosine_lr_at_every_step():
    ref = flyp_reference_lrs(1e-5, 500, 20, 508)                       # iWildCam: ⌈129,809 / 256⌉ = 508
    got = [flyp.flyp_lr(1e-5, 500, 20 * 508, s) for s in range(20 * 508)]
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-20)
    assert got[499] == pytest.approx(1e-5) and got[-1] < 1e-9


@pytest.mark.parametrize("name", ["baseline_flyp.yaml", "baseline_flyp_wise.yaml", "baseline_flyp_vitl14.yaml"])
def test_iwildcam_flyp_baselines_carry_flyps_recipe(name):
    """FLYP's README command for iWildCam: --epochs=20 --lr=1e-5 --wd=0.2 --batch-size=256
    --template=iwildcam_template, warmup_length 500 (args.py), its caption file."""
    tc = load_config(REPO / "configs" / "iwildcam" / name).training
    assert [t.format(name="ocelot") for t in tc.flyp_templates] == [f("ocelot") for f in FLYP_IWILDCAM_TEMPLATE]
    assert (tc.loss, tc.optimizer, tc.lr, tc.weight_decay, tc.epochs) == ("flyp", "adamw", 1e-5, 0.2, 20)
    assert (tc.lr_schedule, tc.warmup_steps, tc.strategy) == ("cosine_steps", 500, "none")
    if "vitl14" not in name:
        assert tc.batch_size == 256


def _tiny_flyp_config(run_root, tmp_path, *extra):
    from clip_fixtures import TINY_CLIP, make_tiny_clip

    json_path, weights = make_tiny_clip(tmp_path / "clip")
    return load_config(None, [
        f"run_root={run_root}", "experiment=flyp", "dataset.image_size=16", "generation.lams=[0.5,0.9]",
        "training.lams=[0.5,0.9,1.0]", "scoring.threshold=0.2", f"scoring.model={TINY_CLIP}",
        f"scoring.model_config_path={json_path}", f"scoring.pretrained={weights}", "training.backbone=clip",
        "training.loss=flyp", "training.task=low_quality", "training.strategy=none", "training.epochs=3",
        "training.curriculum_epochs=0", "training.cpus_per_worker=0.5", "training.batch_size=7",
        "training.lr=0.0005", "training.optimizer=adamw", "training.weight_decay=0.2",
        "training.lr_schedule=cosine_steps", "training.warmup_steps=2",
        "training.flyp_templates=['a photo of {name}.','{name} in the wild.']", "tracking.enabled=false",
        *extra])


def _expected_epoch(cfg, epoch: int, pool=None):
    """(image ids, caption ids) of ``epoch`` by FLYP's draw over the run's real training rows."""
    from discl_ray.runtime.io import stable_seed
    from discl_ray.training import data as D
    from discl_ray.training.schedules import REAL_ONLY

    pool = pool or D.load_pool(cfg)
    idx = D.epoch_indices(cfg, pool, REAL_ONLY, np.random.default_rng(stable_seed(cfg.training.seed, "epoch-set",
                                                                                  epoch)))
    pairs = np.concatenate(flyp.epoch_pair_batches(len(idx), 2, cfg.training.batch_size, epoch, cfg.training.seed))
    rows = idx[pairs % len(idx)]
    return (pool.image_id[rows].tolist(), flyp.caption_ids(pairs, len(idx), pool.labels[rows], pool.num_classes)
            .tolist(), len(idx), pool)


def test_trainer_steps_lr_per_step_and_draws_flyps_captions(ray_local, run_root, tmp_path):
    """The real trainer (Ray Train, one worker, image cache): each epoch reads the images of FLYP's pair batches
    with their captions, in FLYP's order, and every optimizer step's LR is FLYP's cosine_lr at that global step
    (an LR stepped per epoch is constant within an epoch and fails)."""
    from discl_ray.training import build_trainer
    from discl_ray.training.trainer import run_trainer

    cfg = _tiny_flyp_config(run_root, tmp_path)
    write_fixture(cfg, low_quality=True, train_counts=(10, 10, 10))
    trace = tmp_path / "trace"
    trace.mkdir()
    run_trainer(*build_trainer(cfg, run_name="flyp", trace=str(trace)))
    pool, lrs, n = None, [], None
    for epoch in range(3):
        got = json.loads((trace / f"a0-e{epoch}-r0.json").read_text())
        ids, caps, n, pool = _expected_epoch(cfg, epoch, pool)
        assert got["read"] == ids and got["captions"] == caps, epoch
        assert got["first_step"] == len(lrs)
        lrs += got["lr"]
    steps = math.ceil(n / 7)        # 30 images, batch 7: 5 steps; a pass of 60 pairs is 9 batches, so epoch 1
    assert len(lrs) == 3 * steps     # ends with the first batch of a reshuffled pass
    assert lrs == pytest.approx(flyp_reference_lrs(0.0005, 2, 3, steps), rel=1e-12)
    assert len(set(lrs[2:steps])) == steps - 2          # within one epoch the LR moves at every step


@pytest.mark.slow
def test_streamed_flyp_resumes_exactly_with_flyps_pairs(ray_local, run_root, tmp_path):
    """Two workers streaming (image cache off) with FLYP's captions and per-step cosine; rank 0 dies in epoch 1.
    The resumed run's losses, LRs and validation equal an uninterrupted run's, and each epoch's (image,
    caption) pairs over the ranks are FLYP's draw (an image twice with both captions included)."""
    from discl_ray.training import build_trainer
    from discl_ray.training.checkpointing import read_state
    from discl_ray.training.trainer import run_trainer

    cfg = _tiny_flyp_config(run_root, tmp_path, "training.num_workers=2", "training.image_cache_mb=0",
                            "training.max_failures=2", "training.epochs=4")
    write_fixture(cfg, low_quality=True, train_counts=(10, 10, 10))
    marker = tmp_path / "killed.txt"
    hist, finals, pool = {}, {}, None
    for name, fault in (("straight", None), ("resumed", {"epoch": 2, "marker": str(marker), "rank": 0})):
        trace = tmp_path / f"trace-{name}"
        trace.mkdir()
        result = run_trainer(*build_trainer(cfg, run_name=name, trace=str(trace), fault=fault))
        finals[name], hist[name] = result.metrics, read_state(result.checkpoint)["metrics"]
        start = result.metrics["resumed_at_epoch"]
        for epoch in range(start, 4):
            ids, caps, n, pool = _expected_epoch(cfg, epoch, pool)
            got = Counter()
            for r in (0, 1):
                t = json.loads((trace / f"a{start}-e{epoch}-r{r}.json").read_text())
                got.update(zip(t["read"], t["captions"]))
            want = Counter(zip(ids, caps))
            # each rank takes ⌊len/2⌋ pairs of every global batch (lock-step): an odd batch leaves one pair out
            n_got = sum(len(g) // 2 * 2 for g in flyp.epoch_pair_batches(n, 2, 7, epoch, cfg.training.seed))
            assert not got - want and sum(got.values()) == n_got, (name, epoch)
            assert any(c > 1 for c in Counter(i for i, _ in got.elements()).values()) or epoch == 0
    assert marker.exists() and finals["resumed"]["resumed_at_epoch"] >= 1
    for key in ("train_loss", "lr", "val_f1"):
        assert [h[key] for h in hist["resumed"]] == [h[key] for h in hist["straight"]], key
    for key in ("best_epoch", "best_val_f1", "final_test_id_f1"):
        assert finals["resumed"][key] == finals["straight"][key], key
