"""The per-worker training function run by Ray Train (Algorithms 1 and 2, one report per epoch).

Every rank reads the experiment's METADATA (no image bytes) and derives the same epoch row list from
seeded generators; it trains on its own equal slice (DDP averages gradients), whose images come from a
bounded cache or a Ray Data stream (``images.py``). Rank 0 talks to the λ selector actor, evaluates,
checkpoints and logs to MLflow; the chosen λ is broadcast. Mixed precision and the collectives are in
``distributed.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from discl_ray.runtime.io import stable_seed
from discl_ray.training import checkpointing as ckpt
from discl_ray.training import data as D
from discl_ray.training import distributed as dx
from discl_ray.training import flyp, lpft
from discl_ray.training.clip_backbone import caption_prompts, flyp_captions
from discl_ray.training.images import open_images
from discl_ray.training.losses import classification_loss, flyp_loss, log_class_prior
from discl_ray.training.metrics import confusion, lt_metrics, macro_f1, true_class_prob
from discl_ray.training.models import build_model, unwrap
from discl_ray.training.schedules import REAL_ONLY, adaptive_gains, lam_key, learning_rate
from discl_ray.training.transforms import build_pipeline

log = logging.getLogger(__name__)

SELECTION_RANK = "selection_rank"     # checkpoint_score_attribute (see run())


def reset_peak_rss() -> None:
    """Start this process's peak-RSS counter (VmHWM) afresh: Ray may reuse a worker process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since :func:`reset_peak_rss` (Linux; NaN elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Worker:
    """State of one Train worker; ``run()`` is the whole job (see module docstring)."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        from discl_ray.config import load_config

        reset_peak_rss()
        self.cfg = load_config(data=config["cfg"])
        self.tc = self.cfg.training
        self.run_name: str = config["run_name"]
        self.opts = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, int(config.get("torch_threads") or 1)))
        self.device = dx.worker_device()
        self.precision = dx.Precision(self.tc.precision, self.device)
        _record_placement(config.get("workers_dir"), self.rank, str(self.device))
        pool = D.load_pool(self.cfg)
        torch.manual_seed(self.tc.seed)
        prompts = caption_prompts(self.cfg, pool.class_names)   # common names through prompts.name_map
        net = build_model(self.tc.backbone, pool.num_classes, cfg=self.cfg, prompts=prompts,
                          device=self.device, captions=flyp_captions(self.cfg, pool.class_names))
        if self.tc.init_checkpoint:
            net.load_state_dict(ckpt.load_model_state(self.tc.init_checkpoint))
        self.pipe = build_pipeline(self.cfg, getattr(net, "clip", None))
        self.pool, self.images = open_images(self.cfg, pool, self.pipe)
        if hasattr(self.images, "stream"):
            _quiet_ray_data()
        self.guidance_val: Optional[dict[float, np.ndarray]] = None
        self._v_images = None
        if self.tc.strategy == "adaptive":
            self.guidance_val = D.choose_guidance_val(self.cfg, self.pool,
                                                      np.random.default_rng(stable_seed("V", self.tc.seed)))
        self.groups = D.class_groups(self.cfg, self.pool.class_counts(self.pool.train_real))
        self.zero_shot = copy.deepcopy(net.state_dict()) if self.tc.wise_alphas else None
        self.model = dx.prepare_model(net, self.device, self.world)
        self.opt = _optimizer(self.tc, self.model.parameters())
        self.batch = max(1, self.tc.batch_size // self.world)
        self.global_step = 0          # optimizer steps so far (the warm-up's clock; saved in checkpoints)
        self.step_lrs: list[float] = []   # this epoch's per-step LRs (the trace)
        # FLYP's per-step cosine (lr_schedule=cosine_steps, strategy none) runs over the run's step total,
        # known before it starts: every epoch is the real training set (its step count is metadata only).
        self.total_steps = 0
        if self.tc.lr_schedule == "cosine_steps":
            self.total_steps = sum(
                self.epoch_steps(len(D.epoch_indices(self.cfg, self.pool, REAL_ONLY, self._rng("epoch-set", e))),
                                 self.tc.steps_per_epoch, e) for e in range(self.tc.epochs))
        self._epoch = 0
        self._start = 0

    # -- helpers --------------------------------------------------------------------------------
    def _rng(self, *parts) -> np.random.Generator:
        return np.random.default_rng(stable_seed(self.tc.seed, *parts))

    def _set_lr(self, epoch: int) -> float:
        """LR for the next optimizer step (cosine over epochs, linear warm-up over the first steps; or FLYP's
        per-step cosine, a function of the global step)."""
        if self.tc.lr_schedule == "cosine_steps":
            lr = flyp.flyp_lr(self.tc.lr, self.tc.warmup_steps, self.total_steps, self.global_step)
        else:
            lr = learning_rate(self.tc.lr, self.tc.lr_schedule, epoch, self.tc.epochs, self.global_step,
                               self.tc.warmup_steps)
        lr = lpft.epoch_lr(self.tc, epoch, lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr


    def _before_step(self) -> None:
        """Between backward and the optimizer step: LP-FT drops encoder grads while probing; LR warm-up."""
        lpft.drop_encoder_grads(self.model, self.tc, self._epoch)
        if self.tc.warmup_steps or self.tc.lr_schedule == "cosine_steps":
            self._set_lr(self._epoch)
        self.step_lrs.append(self.opt.param_groups[0]["lr"])

    def epoch_steps(self, n_rows: int, max_steps: Optional[int], epoch: int) -> int:
        """Optimizer steps of ``epoch``'s pass over ``n_rows`` rows (the same on every rank): FLYP's ⌈N / B⌉
        with its captions (less a global batch shorter than the world), else ⌈(N // world) / per-rank batch⌉;
        at most ``max_steps``."""
        if self.tc.flyp_templates:
            return len(self._pair_sizes(self._pair_batches(n_rows, epoch)))
        steps = math.ceil((n_rows // self.world) / self.batch)
        return min(steps, max_steps) if max_steps else steps

    def _pair_batches(self, n_rows: int, epoch: int) -> list[np.ndarray]:
        """``epoch``'s global batches of pairs with at least one row per rank (FLYP's loader, ``flyp.py``)."""
        batches = flyp.epoch_pair_batches(n_rows, len(self.tc.flyp_templates), self.tc.batch_size, epoch,
                                          self.tc.seed, self.tc.steps_per_epoch)
        return [g for g in batches if len(g) >= self.world]

    def _pair_sizes(self, batches: list[np.ndarray]) -> list[int]:
        return [len(g) // self.world for g in batches]    # a rank's share of each global batch (lock-step DDP)

    def flyp_plan(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(rows, caption ids, batch sizes) of this rank's epoch with FLYP's captions (``flyp.py``): the epoch's
        global batches of (image, caption) pairs from FLYP's persistent reshuffled loader. The cache takes its
        share of every global batch in FLYP's order; a stream reads the epoch's pairs in its unit order
        (``images.StreamedImages.plan``, every rank planned alike) and gives each occurrence of an image the
        next of its captions in that order, so the epoch's (image, caption) pairs are FLYP's either way."""
        n, n_cls = len(idx), self.pool.num_classes
        batches = self._pair_batches(n, self._epoch)
        sizes = self._pair_sizes(batches)
        if not hasattr(self.images, "plan"):
            pairs = np.concatenate([g[self.rank * s:(self.rank + 1) * s] for g, s in zip(batches, sizes)])
            rows = idx[pairs % n]
            return rows, flyp.caption_ids(pairs, n, self.pool.labels[rows], n_cls), sizes
        pairs = np.concatenate(batches)
        rows_all = idx[pairs % n]
        queue: dict[int, list[int]] = {}
        for r, c in zip(rows_all.tolist(), flyp.caption_ids(pairs, n, self.pool.labels[rows_all], n_cls).tolist()):
            queue.setdefault(r, []).append(c)
        mine, caps = None, None
        for rank in range(self.world):
            planned = self.images.plan(rows_all, copy.deepcopy(rng), rank, self.world)[:sum(sizes)]
            got = np.array([queue[r].pop(0) for r in planned.tolist()], dtype=np.int64)
            if rank == self.rank:
                mine, caps = planned, got
        return mine, caps, sizes

    def _loss(self, x: torch.Tensor, y: torch.Tensor, prior) -> torch.Tensor:
        with self.precision.autocast():
            if self.tc.loss == "flyp":
                img, txt, scale = self.model(x, flyp_labels=y)
                # The paper's batch is global: contrast against every rank's pairs, not the local slice.
                return flyp_loss(dx.gather_with_grad(img.float()), dx.gather_with_grad(txt.float()), scale.float())
            return classification_loss(self.tc.loss, self.model(x).float(), y, prior)

    def train_on(self, idx: np.ndarray, rng: np.random.Generator, max_steps: Optional[int],
                 trace: bool = False) -> tuple[float, int]:
        """One pass over ``idx`` (shuffled, this rank's slice); returns (mean loss over ranks, samples seen)."""
        captions: Optional[dict[int, list[int]]] = None
        if self.tc.flyp_templates:
            # FLYP's captions: (image, caption) pairs drawn as FLYP's loader draws them (flyp_plan).
            rows, caps, sizes = self.flyp_plan(idx, rng)
            captions = {}
            for r, c in zip(rows.tolist(), caps.tolist()):
                captions.setdefault(r, []).append(c)
        else:
            if hasattr(self.images, "plan"):
                # Streamed: the same epoch rows as the cache path, ordered unit by unit in a seeded unit order
                # and mixed by a seeded buffer (images.StreamedImages.plan), so each storage unit is read once.
                mine = self.images.plan(idx, rng, self.rank, self.world)
            else:
                mine = D.shard(rng.permutation(idx), self.rank, self.world)
            steps = self.epoch_steps(len(idx), max_steps, self._epoch)
            # Planned batch sizes are a function of metadata only: identical on every rank (lock-step DDP).
            sizes = [min(self.batch, len(mine) - k * self.batch) for k in range(steps)]
            rows = mine[:sum(sizes)]
        steps = len(sizes)
        counts = self.pool.class_counts(idx)
        prior = log_class_prior(counts).to(self.device) if self.tc.loss == "balanced_softmax" else None
        self.model.train()
        self.step_lrs = []
        fault = self.opts.get("fault")
        seed = stable_seed(self.tc.seed, "augment", self._epoch, self.global_step)
        total, n_batches, seen, read, read_caps = 0.0, 0, 0, [], []
        for step, (x, sel) in enumerate(self.images.batches(rows, sizes, True, seed)):
            if fault and self._should_fail(fault, step, steps):
                # A real worker death (tests of FailureConfig restarts); the pause lets the controller
                # register the previous epoch's checkpoint first, as it would in any epoch longer than its poll.
                time.sleep(float(fault.get("delay_s", 3.0)))
                os._exit(17)
            x = self.pipe.normalise(x.to(self.device, non_blocking=True))
            y = torch.as_tensor(self.pool.labels[sel], device=self.device)
            if captions is not None:
                # each occurrence of an image takes its next planned caption (a padded repeat, its last)
                cap = [captions[r].pop(0) if len(captions[r]) > 1 else captions[r][0] for r in sel.tolist()]
                read_caps.extend(cap)
                y = torch.as_tensor(cap, device=self.device)
            loss = self._loss(x, y, prior)
            self.opt.zero_grad(set_to_none=True)
            self.precision.step(loss, self.opt, self._before_step)
            self.global_step += 1
            total += float(loss.detach())
            n_batches += 1
            seen += len(sel)
            if trace and self.opts.get("trace"):
                read.extend(self.pool.image_id[sel].tolist())
        if trace and self.opts.get("trace"):
            out = Path(self.opts["trace"]) / f"a{self._start}-e{self._epoch}-r{self.rank}.json"
            out.write_text(json.dumps({"read": read, "planned": self.pool.image_id[rows].tolist(),
                                       "captions": read_caps, "lr": self.step_lrs,
                                       "first_step": self.global_step - n_batches}))
        return dx.allreduce_mean(total / max(n_batches, 1), self.device), seen * self.world

    def _should_fail(self, fault: dict, step: int, steps: int) -> bool:
        marker = Path(fault["marker"])
        if (self.rank != fault.get("rank", self.world - 1) or self._epoch != fault["epoch"]
                or step != steps // 2 or marker.exists()):
            return False
        marker.write_text(f"killed rank {self.rank} at epoch {self._epoch} step {step}\n")
        return True

    def _eval_kw(self) -> dict:
        return dict(device=self.device, batch=self.tc.eval_batch_size, autocast=self.precision.autocast)

    def evaluate(self, split: str, model=None, sharded: bool = False) -> tuple[dict[str, float], np.ndarray]:
        """Validation/test metrics of ``split`` (prefix = split name with ``_id`` for low-quality test).

        ``sharded`` (every rank calls it): each rank scores its contiguous share of the split and the confusion
        matrices are summed over the ranks, so every rank gets the metrics of the whole split; otherwise the
        calling rank scores the whole split alone."""
        idx = self.pool.split_idx(split)
        if sharded and self.world > 1:
            idx = np.array_split(idx, self.world)[self.rank]
        cm = confusion(unwrap(model if model is not None else self.model), self.pool, self.images, idx,
                       **self._eval_kw())
        if sharded and self.world > 1:
            cm = dx.allreduce_sum_array(cm, self.device)
        if self.tc.task == "long_tail":
            return lt_metrics(cm, self.groups, split), cm
        f1 = macro_f1(cm)
        acc = float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan")
        return {f"{split}_f1": f1, f"{split}_acc": acc}, cm

    def _probs_on_v(self) -> dict[float, np.ndarray]:
        if self._v_images is None:
            # V is small: a stream decodes it once per run and keeps it (no new stream per λ and probe).
            held = getattr(self.images, "held", None)
            self._v_images = held(np.concatenate(list(self.guidance_val.values()))) if held else self.images
        return {lam: true_class_prob(self.model, self.pool, self._v_images, idx, **self._eval_kw())
                for lam, idx in self.guidance_val.items()}

    def probe_gains(self, epoch: int) -> dict[float, float]:
        """Algorithm 2 lines 2-5: p_bef on V, train on a random real set D, p_aft on V; robust mean gain per λ.

        Every rank trains on D (DDP); only rank 0 scores V (it alone talks to the selector)."""
        assert self.guidance_val is not None
        before = self._probs_on_v() if self.rank == 0 else {}
        d_all = self.pool.train_real
        rng = self._rng("random-real", epoch)
        d = rng.choice(d_all, size=min(self.tc.random_real_size, len(d_all)), replace=False)
        # The paper trains the model itself on D (not a copy): the probe is part of training.
        self.probe_seen = self.train_on(d, rng, self.tc.probe_steps)[1]   # counted in loop_samples
        if self.rank != 0:
            return {}
        return adaptive_gains(before, self._probs_on_v())

    def _save(self, epoch: int, best: dict, history: list, selector, epoch_log, model=None, **extra):
        import ray

        return ckpt.save(unwrap(model if model is not None else self.model), self.opt, epoch=epoch, best=best,
                         selector=ray.get(selector.state.remote()), metrics=history,
                         mlflow_run_id=epoch_log.run_id, global_step=self.global_step,
                         scaler=self.precision.state_dict(), **extra)

    # -- the job --------------------------------------------------------------------------------
    def run(self) -> None:
        import ray
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        from discl_ray.training.selector import actor_name

        selector = ray.get_actor(actor_name(self.run_name), namespace=self.opts.get("namespace"))
        state = ckpt.restore(ray.train.get_checkpoint(), unwrap(self.model), self.opt)
        self.precision.load_state_dict(state.get("scaler"))
        start = self._start = state.get("epoch", -1) + 1
        self.global_step = int(state.get("global_step", 0))
        if start:
            log.info("resuming %s from its checkpoint at epoch %d", self.run_name, start)
        if self.rank == 0:
            # Restore the selector to the checkpoint's epochs: a choice made in an epoch after it is redone.
            ray.get(selector.load_state.remote(state["selector"], start) if "selector" in state
                    else selector.load_state.remote(ray.get(selector.state.remote()), 0))
        if state.get("final"):
            # The run already finished (rerun of the same name): return its result, log nothing twice.
            ray.train.report(state["final"] if self.rank == 0 else {})
            return
        best = state.get("best", {"value": -math.inf, "epoch": -1, "checkpoint": None})
        history: list[dict] = state.get("metrics", [])
        loop_t0, samples_total = time.perf_counter(), 0
        with self._mlflow(state.get("mlflow_run_id")) as mlrun:
            epoch_log = EpochLog(mlrun, history if state.get("mlflow_run_id") else None)
            for epoch in range(start, self.tc.epochs):
                self._epoch = epoch
                # Every random draw of the epoch is seeded by (seed, epoch): a re-run epoch repeats exactly.
                torch.manual_seed(stable_seed(self.tc.seed, "torch", epoch))
                self._set_lr(epoch)
                t0 = time.perf_counter()
                gains: dict[float, float] = {}
                adaptive = self.tc.strategy == "adaptive" and epoch < self.tc.curriculum_epochs
                if adaptive:
                    gains = self.probe_gains(epoch)
                    samples_total += self.probe_seen
                probe_s = time.perf_counter() - t0
                lam = None
                if self.rank == 0:
                    lam = ray.get(selector.choose.remote(epoch, gains or None))
                if self.world > 1:
                    lam = broadcast_from_rank_zero(lam)
                lam = float(lam)
                # Every rank must train on the same λ's set; checked on device (two scalar collectives).
                key = 2.0 if math.isnan(lam) else lam
                agree = dx.allreduce_max(key, self.device) == -dx.allreduce_max(-key, self.device)
                idx = D.epoch_indices(self.cfg, self.pool, lam, self._rng("epoch-set", epoch))
                t1 = time.perf_counter()
                loss, seen = self.train_on(idx, self._rng("shuffle", epoch), self.tc.steps_per_epoch, trace=True)
                train_s = time.perf_counter() - t1
                samples_total += seen
                lr = self.opt.param_groups[0]["lr"]      # the last step's (the warm-up moves it within an epoch)
                metrics: dict[str, Any] = {"epoch": epoch, "lam": lam, "train_loss": loss, "lr": lr,
                                           "n_train": int(len(idx)), "samples_per_s": seen / max(train_s, 1e-9),
                                           "epoch_train_s": train_s, "adaptive_probe_s": probe_s if adaptive else 0.0,
                                           "lam_ranks_agree": float(agree)}
                metrics.update({f"gain_lam_{lam_key(k)}": v for k, v in gains.items()})
                checkpoint, name = None, None
                # Validation sharded over the ranks (each scores its share; the counts are summed).
                t2 = time.perf_counter()
                val, _ = self.evaluate("val", sharded=True)
                if self.rank == 0:
                    metrics.update(val)
                    metrics["epoch_val_s"] = time.perf_counter() - t2
                # Largest peak RSS over the Train workers so far (the memory bound of docs/scaling.md).
                metrics["worker_peak_rss_mb"] = dx.allreduce_max(peak_rss_mb(), self.device)
                if self.rank == 0:
                    value = metrics[self.tc.select_metric]
                    improved = value > best["value"] or best.get("checkpoint") is None
                    name = f"checkpoint_epoch{epoch:04d}_a{start}"
                    if improved:   # model selection on validation only
                        best = {"value": float(value), "epoch": epoch, "checkpoint": name,
                                "rank": int(best.get("rank", 0)) + 1}
                    history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                    epoch_log.add(epoch, metrics)
                    # Ray Train ranks checkpoints by this (CheckpointConfig.checkpoint_score_attribute): the
                    # ordinal of the validation improvement, -1 for a scheduled checkpoint that did not improve.
                    # Ranking on the raw metric would let a later tie outrank the selected (first) best and
                    # delete it. Kept out of MLflow and the history.
                    metrics[SELECTION_RANK] = best["rank"] if improved else -1
                    # Checkpoints at the scheduled epochs and whenever validation improves: the selected
                    # model lives in storage (kept by CheckpointConfig's score), never as a second copy here.
                    if improved or ckpt.is_checkpoint_epoch(epoch, self.tc.epochs, self.tc.checkpoint_every):
                        checkpoint = self._save(epoch, best, history, selector, epoch_log)
                # Every epoch reports its metrics (Tune sees each); only checkpoint epochs carry a checkpoint.
                ray.train.report(metrics, checkpoint=checkpoint,
                                 checkpoint_dir_name=name if checkpoint is not None else None)
                if checkpoint is not None:
                    ckpt.cleanup(checkpoint)
                    epoch_log.flush()   # only now: a restart resumes after these epochs (see EpochLog)
            final, checkpoint = {}, None
            # Throughput of this attempt's epoch loop (training, probes, validation, reports, checkpoints).
            loop_s = time.perf_counter() - loop_t0
            n_bad = self._bad_images()
            if self.rank == 0:
                net = self.selected_model(best)
                final = self.finish(best, net, history, selector, mlrun, n_bad)
                final.update(loop_s=loop_s, loop_samples=samples_total,
                             loop_samples_per_s=samples_total / max(loop_s, 1e-9),
                             worker_peak_rss_mb=max(h.get("worker_peak_rss_mb", 0.0) for h in history))
                # The final checkpoint holds the SELECTED model (training.init_checkpoint reads it).
                checkpoint = self._save(self.tc.epochs - 1, best, history, selector, epoch_log, model=net,
                                        final=final)
                final[SELECTION_RANK] = int(best.get("rank", 0)) + 1
            ray.train.report(final, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_final_a{start}" if checkpoint is not None else None)
            ckpt.cleanup(checkpoint)

    def _bad_images(self) -> int:
        """Undecodable images met by any rank (the cache knows them all at load; a stream as it reads)."""
        if hasattr(self.images, "bad"):
            return self.pool.n_bad_images + len(set().union(*dx.gather_objects(self.images.bad, self.device)))
        return self.pool.n_bad_images

    def selected_model(self, best: dict) -> torch.nn.Module:
        """The model of the best validation epoch, read back from its checkpoint in storage."""
        import ray.train

        net = copy.deepcopy(unwrap(self.model))
        if best.get("epoch") == self._epoch or not best.get("checkpoint"):
            return net                  # the current weights are the selected ones
        storage = ray.train.get_context().get_storage()
        path = storage.build_checkpoint_path_from_name(best["checkpoint"])
        state = ckpt.read_state(ray.train.Checkpoint(path, filesystem=storage.storage_filesystem))
        net.load_state_dict(state["model"])
        return net

    def finish(self, best: dict, net, history: list, selector, mlrun, n_bad: int) -> dict[str, Any]:
        """Test metrics of the checkpoint selected on validation (+ WiSE-FT per α), plots, artifacts."""
        import ray

        final: dict[str, Any] = {"best_epoch": best["epoch"], f"best_{self.tc.select_metric}": best["value"],
                                 "resumed_at_epoch": self._start,
                                 "select_metric": self.tc.select_metric, "n_bad_images": n_bad}
        # The validation metrics of the selected epoch, under their per-epoch names, so a Tune sweep ranking
        # trials by e.g. ``val_acc`` reads the selected model's score from the last report.
        chosen = next((h for h in history if h.get("epoch") == best["epoch"]), {})
        final.update({k: v for k, v in chosen.items() if k.startswith("val_")})
        if self.tc.task == "long_tail":
            m, cm = self.evaluate("test", net)
            final.update({f"final_{k}": v for k, v in m.items()})
        else:
            m, cm = self.evaluate("test", net)
            final["final_test_id_f1"] = m["test_f1"]
            if len(self.pool.split_idx("test_ood")):
                final["final_test_ood_f1"] = self.evaluate("test_ood", net)[0]["test_ood_f1"]
        if self.zero_shot is not None:
            from discl_ray.training.wise import wise_on_validation

            # α chosen on ID validation; only that α is evaluated on the test splits.
            final.update(wise_on_validation(self.evaluate, self.tc, self.zero_shot, net, ckpt.cpu_state(net),
                                            bool(len(self.pool.split_idx("test_ood")))))
        sel_history = ray.get(selector.get_history.remote())
        final["lam_history"] = [h["lam"] for h in sel_history]
        final["gain_history"] = [h["gains"] for h in sel_history]   # adaptive: per epoch {λ: gain on V}
        if mlrun is not None:
            _log_final(self.cfg, final, sel_history, cm, self.pool.class_names, net)
        return final

    @contextlib.contextmanager
    def _mlflow(self, run_id: Optional[str]):
        """MLflow run on rank 0 only (None elsewhere or when tracking is off); a resumed job reopens its run."""
        if self.rank != 0 or not self.cfg.tracking.enabled:
            yield None
            return
        import mlflow

        from discl_ray.runtime import tracking

        if run_id:
            tracking.setup(self.cfg)
            with mlflow.start_run(run_id=run_id) as active:
                yield active
        else:
            with tracking.run(self.cfg, "train", run_name=self.run_name,
                              parent_run_id=self.opts.get("parent_run_id"),
                              tags={"run_name": self.run_name}) as active:
                from discl_ray.generation.store import log_store_input

                log_store_input(self.cfg, "train")
                yield active


def _quiet_ray_data() -> None:
    """No progress bars from the per-epoch datasets in worker logs; order kept: the stream reads storage units
    in the epoch's planned order (images.StreamedImages)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True


def _optimizer(tc, params):
    if tc.optimizer == "adam":
        return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay)


def _numeric(metrics: dict) -> dict[str, float]:
    # NaN is kept (MLflow stores it): λ of an all_level epoch is NaN by convention.
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EpochLog:
    """Per-epoch metrics on their way to MLflow: each epoch is written exactly once over all attempts.

    ``add`` buffers an epoch; ``flush`` writes the buffer in one ``log_batch`` and is called once the
    checkpoint holding those epochs has been reported, so a restart (which resumes after that checkpoint)
    never re-runs an epoch MLflow already has. A reopened run also reconciles with what the earlier attempt
    wrote (its ``epoch`` metric marks complete epochs): checkpointed epochs the attempt died before writing are
    written now, and re-run epochs it had written (a checkpoint reported but not yet registered by Ray
    Train when the worker died) are skipped.
    """

    def __init__(self, run, history: Optional[list[dict]] = None):
        self.run_id: Optional[str] = run.info.run_id if run is not None else None
        self.pending: list[tuple[int, int, dict[str, float]]] = []   # (epoch, timestamp ms, metrics)
        self.logged = -1                                               # last epoch MLflow holds
        if self.run_id is None:
            return
        import mlflow

        self.client = mlflow.MlflowClient()
        if history is not None:   # a reopened run
            self.logged = max((m.step for m in self.client.get_metric_history(self.run_id, "epoch")), default=-1)
            for h in history:        # in the checkpoint we resume from, so safe to write at once
                self.add(int(h["epoch"]), h)
            self.flush()

    def add(self, epoch: int, metrics: dict) -> None:
        if self.run_id is not None and epoch > self.logged:
            self.pending.append((epoch, int(time.time() * 1000), _numeric(metrics)))

    def flush(self) -> None:
        if not self.pending:
            return
        from mlflow.entities import Metric

        # "epoch" goes last within its epoch: its presence marks the epoch as completely written.
        batch = [Metric(k, v, ts, epoch) for epoch, ts, values in self.pending
                 for k, v in sorted(values.items(), key=lambda kv: kv[0] == "epoch")]
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged = self.pending[-1][0]
        self.pending.clear()


def _log_final(cfg, final: dict, sel_history: list, cm: np.ndarray, class_names: list, net) -> None:
    import mlflow
    import yaml

    from discl_ray.training.metrics import save_confusion_plot, save_lam_plot

    # val_* are already in MLflow per epoch; repeating the selected epoch's values would add a step-0 point.
    mlflow.log_metrics({k: v for k, v in _numeric(final).items() if not k.startswith("val_")})
    mlflow.set_tag("lam_history", ",".join(f"{v:g}" for v in final["lam_history"])[:5000])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        save_lam_plot(sel_history, tmp / "lam_schedule.png", cfg.training.curriculum_epochs)
        save_confusion_plot(cm, class_names, tmp / "confusion_test.png", "test (selected on validation)")
        (tmp / "lam_history.json").write_text(json.dumps(sel_history, indent=1))
        for name in ("config.yaml", "lam_history.json", "lam_schedule.png", "confusion_test.png"):
            mlflow.log_artifact(str(tmp / name))
        if cfg.tracking.log_checkpoint is not False:     # None: a single run's default (sweeps set False)
            ckpt.save_model_file(net, tmp / "model" / "model.pt")
            mlflow.log_artifacts(str(tmp / "model"), artifact_path="checkpoint")


def _record_placement(workers_dir: Optional[str], rank: int, device: str) -> None:
    """``<run>/workers/rank-<r>.json``: the node, assigned resources and device of this rank (the generator and
    scorer actors record theirs in their stage summaries); read by ``discl rehearse`` and by people asking where a
    run trained. Bookkeeping: a failure is logged, never raised."""
    if not workers_dir:
        return
    try:
        from discl_ray.runtime.cluster import actor_info
        from discl_ray.runtime.storage import as_storage

        info = dict(actor_info(device), rank=rank)
        (as_storage(workers_dir) / f"rank-{rank}.json").write_text(json.dumps(info, sort_keys=True))
    except Exception as err:  # noqa: BLE001
        log.warning("rank %d: placement not recorded in %s: %s", rank, workers_dir, err)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``."""
    Worker(config).run()
