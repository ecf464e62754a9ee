"""Algorithm 2's guidance-validation set V never starves a class: at most a bounded share of each class's real
hard images is held out (never all; a class with one keeps it), V has equally many rows per λ (the originals
at λ = 1), only V's rows leave the training sets, and V is non-empty per λ whenever some class can spare one. Pure metadata: no parquet, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from discl_ray.config import load_config
from discl_ray.training import data as D
from discl_ray.training.schedules import REAL_ONLY

LAMS = [0.0, 0.5, 1.0]


def make(hard_per_class: list[int], nonhard_per_class: list[int], *, task: str = "long_tail", fraction=None,
         size: int = 2000, seeds_per_lam: int = 4, drop_syn: frozenset = frozenset()):
    """A pool: class c has ``hard_per_class[c]`` real hard training images (each with ``seeds_per_lam``
    synthetic rows per λ < 1, except the sources in ``drop_syn``) and ``nonhard_per_class[c]`` others."""
    over = ["training.strategy=adaptive", f"training.task={task}", f"training.lams={LAMS}",
            f"training.guidance_val_size={size}", "mining.few_max=10", "mining.many_min=20"]
    if fraction is not None:
        over.append(f"training.guidance_val_fraction={fraction}")
    cfg = load_config(None, over)
    ids, labels, splits, names, hard = [], [], [], [], set()
    syn = {"image_id": [], "label": [], "lam": [], "source_image_id": []}
    for c, (nh, nn) in enumerate(zip(hard_per_class, nonhard_per_class)):
        for i in range(nh + nn):
            rid = f"c{c}-{i}"
            ids.append(rid), labels.append(c), splits.append("train"), names.append(str(c))
            if i < nh:
                hard.add(rid)
                if rid in drop_syn:
                    continue
                for lam in LAMS[:-1]:
                    for s in range(seeds_per_lam):
                        syn["image_id"].append(f"{rid}-{lam}-{s}"), syn["label"].append(c)
                        syn["lam"].append(lam), syn["source_image_id"].append(rid)
        ids.append(f"c{c}-val"), labels.append(c), splits.append("val"), names.append(str(c))
    real = pa.table({"image_id": ids, "label": labels, "class_name": names, "split": splits})
    syn_t = pa.table({"image_id": pa.array(syn["image_id"], pa.string()), "label": pa.array(syn["label"], pa.int64()),
                      "lam": pa.array(syn["lam"], pa.float64()),
                      "source_image_id": pa.array(syn["source_image_id"], pa.string())})
    return cfg, D.build_pool(cfg, real, hard, syn_t)


DIGITS_LT_TAIL = [0, 0, 0, 0, 0, 8, 6, 4, 3, 2]          # lt_counts(50, 25): classes under few_max = 10 are hard
DIGITS_LT_HEAD = [50, 35, 24, 17, 12, 0, 0, 0, 0, 0]
SHAPES = [
    (DIGITS_LT_TAIL, DIGITS_LT_HEAD),
    ([6] * 10, [20] * 10),                                   # digits-LQ: the 6 least confident per class
    ([1, 1, 1, 2], [0, 0, 0, 0]),                            # only one class can spare an image
    ([2, 3, 1, 7, 1, 5], [0, 4, 0, 0, 9, 0]),
    ([40, 1, 2], [0, 0, 0]),
]


def v_rows(val) -> set:
    return set(np.concatenate(list(val.values())).tolist())


@pytest.mark.parametrize("fraction", [None, 0.5, 0.9])
@pytest.mark.parametrize("size", [1, 8, 2000])
@pytest.mark.parametrize("shape", SHAPES, ids=["digits_lt", "digits_lq", "one_spare", "mixed", "skewed"])
def test_v_never_starves_a_class(shape, size, fraction):
    hard_pc, nonhard_pc = shape
    cfg, pool = make(hard_pc, nonhard_pc, fraction=fraction, size=size)
    for seed in range(6):
        f = cfg.training.guidance_val_fraction
        val = D.choose_guidance_val(cfg, pool, np.random.default_rng(seed))
        held = pool.heldout_sources
        label = {f"c{c}-{i}": c for c, n in enumerate(hard_pc) for i in range(n)}
        per_class = np.bincount([label[s] for s in held], minlength=len(hard_pc))
        share_zero = all(math.floor(f * n + 1e-9) == 0 for n in hard_pc)
        for c, n in enumerate(hard_pc):
            assert per_class[c] <= max(0, n - 1), (c, n, per_class[c])          # never all; one hard image stays
            if not share_zero:
                assert per_class[c] <= math.floor(f * n + 1e-9)                  # the bounded share
        assert 1 <= len(held) <= size
        # every class keeps real training images: V removes none of a class's last ones
        kept = pool.class_counts(pool.train_real)
        for c, (nh, nn) in enumerate(zip(hard_pc, nonhard_pc)):
            if nh + nn:
                assert kept[c] >= 1 and kept[c] >= nn + nh - per_class[c]
        # equal size per λ (one row per source), and no row of V is a training row
        assert set(val) == set(LAMS) and {len(v) for v in val.values()} == {len(held)}
        for lam in [*LAMS, REAL_ONLY, math.nan]:
            idx = D.epoch_indices(cfg, pool, lam, np.random.default_rng(seed))
            assert not set(idx.tolist()) & v_rows(val)


@pytest.mark.parametrize("shape", SHAPES, ids=["digits_lt", "digits_lq", "one_spare", "mixed", "skewed"])
def test_v_is_algorithm_2s_and_only_v_leaves_training(shape):
    """V per λ: the originals at λ = 1, one synthetic sibling per source at λ < 1, equal sizes; V shares no
    image with any training set; and every row outside V still trains (only V leaves D_all)."""
    hard_pc, nonhard_pc = shape
    cfg, pool = make(hard_pc, nonhard_pc, task="low_quality")
    before = {lam: set(D.epoch_indices(cfg, pool, lam, np.random.default_rng(0)).tolist())
              for lam in [*LAMS, REAL_ONLY, math.nan]}
    val = D.choose_guidance_val(cfg, pool, np.random.default_rng(3))
    vr = v_rows(val)
    n = len(pool.heldout_sources)
    assert n >= 1 and all(len(v) == n for v in val.values())
    assert set(pool.split[val[1.0]]) == {"train"} and pool.hard[val[1.0]].all()        # the originals
    assert set(pool.source[val[1.0]]) == pool.heldout_sources
    for lam in LAMS[:-1]:
        assert set(pool.split[val[lam]]) == {"syn"} and np.allclose(pool.lam[val[lam]], lam)
        assert sorted(pool.source[val[lam]]) == sorted(pool.heldout_sources)           # paired by source
    assert set(pool.image_id[list(vr)]).isdisjoint(pool.image_id[pool.train_real])
    for lam, rows in before.items():
        after = set(D.epoch_indices(cfg, pool, lam, np.random.default_rng(0)).tolist())
        assert not after & vr
        assert after == rows - vr, lam                                                   # nothing else left
    # a held-out source's other synthetic rows still train
    sibling = [i for i in pool.syn_idx(0.0) if pool.source[i] in pool.heldout_sources]
    assert len(sibling) == n * 3                                                         # 4 seeds, 1 in V


def test_digits_lt_shape_holds_out_a_bounded_share():
    cfg, pool = make(DIGITS_LT_TAIL, DIGITS_LT_HEAD)                         # the defaults: fraction 0.25
    val = D.choose_guidance_val(cfg, pool, np.random.default_rng(0))
    held = sorted(pool.heldout_sources)
    by_class = {c: sum(s.startswith(f"c{c}-") for s in held) for c in range(5, 10)}
    assert by_class == {5: 2, 6: 1, 7: 1, 8: 0, 9: 0}                           # ⌊0.25 · (8, 6, 4, 3, 2)⌋
    assert {lam: len(v) for lam, v in val.items()} == {0.0: 4, 0.5: 4, 1.0: 4}
    # the size cap binds before the share: 2 rows per λ = 2 sources
    cfg, pool = make(DIGITS_LT_TAIL, DIGITS_LT_HEAD, size=2, fraction=0.5)
    D.choose_guidance_val(cfg, pool, np.random.default_rng(0))
    assert len(pool.heldout_sources) == 2
    assert len({s.split("-")[0] for s in pool.heldout_sources}) == 2            # round-robin: two classes


def test_v_needs_a_class_that_can_spare_an_image():
    cfg, pool = make([1, 1, 1], [5, 5, 5])
    with pytest.raises(ValueError, match="only hard image"):
        D.choose_guidance_val(cfg, pool, np.random.default_rng(0))
    # a source without synthetic rows is never held out (V is its spectrum), but it counts in n_c
    cfg, pool = make([2, 1], [0, 0], drop_syn=frozenset({"c0-0"}))
    D.choose_guidance_val(cfg, pool, np.random.default_rng(0))
    assert pool.heldout_sources == {"c0-1"}
