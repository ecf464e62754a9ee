"""Schema for curriculum training (paper §3.2, Algorithms 1 and 2, Table 8)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from discl_ray.config.base import StrictModel
from discl_ray.config.generation import check_lams

Strategy = Literal["none", "diverse_to_specific", "specific_to_diverse", "easy_to_hard", "random",
                   "fixed", "text_only", "all_level", "adaptive"]
STRATEGIES: tuple[str, ...] = Strategy.__args__  # type: ignore[attr-defined]
# Validation metrics a run may select its checkpoint on (first = default); never a test metric.
SELECT_METRICS = {"long_tail": ("val_acc", "val_few_acc"),
                  "low_quality": ("val_f1", "val_acc")}


class ClipBackboneConfig(StrictModel):
    """The CLIP that training fine-tunes; None fields fall back to ``scoring`` (the filter model).

    Why separate: the paper filters with ViT-B/32 but fine-tunes ViT-B/16 and ViT-L/14 (Table 4/5)."""

    model: Optional[str] = Field(None, description="open_clip architecture, e.g. ViT-B-16 (None = scoring.model).")
    pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or weights file (paper: openai); "
                                                        "None with a model set = random init.")
    model_config_path: Optional[str] = Field(None, description="JSON registering a custom architecture.")


class TrainingConfig(StrictModel):
    """The classifier, its data per epoch, and the λ selector that picks each epoch's guidance level."""

    task: Literal["long_tail", "low_quality"] = Field(
        "long_tail", description="long_tail: many/medium/few accuracy; low_quality: ID/OOD macro-F1.")
    strategy: Strategy = Field("diverse_to_specific",
                               description="λ selector; 'none' = real data only (baseline).")
    lams: list[float] = Field([0.0, 0.1, 0.3, 0.5, 1.0], min_length=1,
                              description="Guidance set Λ the curriculum walks (λ = 1: real hard images only).")
    fixed_lam: Optional[float] = Field(None, ge=0, le=1, description="λ for strategy=fixed.")
    threshold: Optional[float] = Field(None, ge=-1, le=1,
                                       description="CLIP image–text cosine filter applied at load (None = scoring.threshold).")
    epochs: int = Field(65, ge=1, description="Total epochs E.")
    curriculum_epochs: int = Field(60, ge=0, description="Curriculum epochs E_CL; real-only afterwards.")
    loss: Literal["ce", "balanced_softmax", "flyp"] = Field("ce", description="Training loss.")
    backbone: Literal["resnet10", "small_cnn", "clip"] = Field("resnet10", description="Classifier backbone.")
    resnet_width: int = Field(64, ge=4, description="backbone=resnet10: channels of the first stage (the stages "
                                                    "double it); 64 = the paper's ResNet-10, discl rehearse: 8.")
    init_checkpoint: Optional[str] = Field(None, description="Start from this checkpoint (None = scratch or CLIP weights).")
    init_from: Optional[str] = Field(
        None, description="Start from another run's best-on-validation model, named '<experiment>[/<run name>]' "
                          "(Algorithm 1 fine-tunes a pretrained classifier: the CE baseline's checkpoint); "
                          "resolved before training, a clear error when that run has not finished yet.")
    clip: ClipBackboneConfig = Field(default_factory=ClipBackboneConfig,
                                     description="backbone=clip: the fine-tuned CLIP, separate from the filter model.")
    head: Literal["zero_shot", "linear"] = Field(
        "zero_shot", description="backbone=clip: class head from the text tower (FLYP) or a linear layer initialised "
                                 "from the zero-shot weights (LP-FT, Kumar et al. 2022).")
    lp_epochs: int = Field(0, ge=0, description="LP-FT: first N epochs train only the linear head (encoder frozen), "
                                                "then full fine-tuning.")
    lp_lr: Optional[float] = Field(None, gt=0, description="LP-FT: learning rate of the linear-probe epochs "
                                                           "(None = training.lr).")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer; paper: Adam.")
    lr: float = Field(1e-3, gt=0, description="Learning rate; paper: 1e-3 (ResNet-10).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    lr_schedule: Literal["cosine", "constant", "cosine_steps"] = Field(
        "cosine", description="Learning-rate schedule; paper: cosine. cosine: per epoch (times the warm-up); "
                              "cosine_steps: FLYP's cosine_lr, per optimizer step over the run's steps after a "
                              "linear warm-up of warmup_steps (strategy none: the step total is known up front).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up over the first N optimizer steps "
                                                   "(probe steps included), on top of lr_schedule; paper: 500 for "
                                                   "iWildCam CLIP fine-tuning, 0 for ResNet-10.")
    batch_size: int = Field(128, ge=1, description="Global batch size; paper: 128 (ResNet-10), 256 (ViT-B/16).")
    flyp_templates: list[str] = Field(
        default_factory=list, description="loss=flyp: FLYP's captions, one (image, caption) pair per template per "
                                          "training image ({name} = the class's display name), drawn as FLYP's "
                                          "loader draws them (⌈N/B⌉ steps per epoch from one reshuffled pass "
                                          "over the pairs); FLYP's iWildCam data: ['a photo of {name}.', "
                                          "'{name} in the wild.']. Empty: one caption per class, "
                                          "prompts.clip_template.")
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="Cap on steps per epoch (None = one pass).")
    use_real_hard: bool = Field(True, description="Long-tail: include real hard images D_h at every stage (Alg. 1).")
    keep_tail_ratio: bool = Field(True, description="Long-tail: undersample non-tail rows so tail:non-tail stays constant.")
    tail_ratio: Optional[float] = Field(None, gt=0, description="Tail:non-tail ratio to keep (None = from data; paper 13.6%).")
    tail_ratio_stages: Literal["all", "curriculum"] = Field(
        "curriculum", description="Where keep_tail_ratio undersamples: only curriculum stages (A.1.2; baselines and "
                                  "real-only epochs keep all real data) or every epoch (the older behaviour).")
    tail_ratio_rule: Literal["paper", "authors"] = Field(
        "paper", description="paper: undersample non-tail so tail:non-tail = tail_ratio (A.1.2); authors: the "
                             "released code's variant, keep authors_nontail_keep of non-tail and cut tail rows to "
                             "tail_ratio of the stage total.")
    authors_nontail_keep: float = Field(0.3, gt=0, le=1,
                                        description="tail_ratio_rule=authors: share of non-tail rows kept per stage.")
    ablations_use_real_hard: bool = Field(
        False, description="Long-tail: fixed-λ and text-only stages also get the real hard images (§5 says they do "
                           "not; true reproduces runs made before that rule).")
    syn_per_source: Optional[int] = Field(
        None, ge=1, description="Synthetic images per (source, λ) used in training, lowest seeds first after the "
                                "CLIP filter (the 'how much synthetic data' ablation; None = all).")
    random_real_size: int = Field(30000, ge=1, description="Adaptive: size of the random real set D (Alg. 2).")
    guidance_val_size: int = Field(
        2000, ge=1, description="Adaptive: most guidance-validation images per λ (set V; paper |V| = 2,000). V holds "
                                "one row per λ of each held-out hard source (its original at λ = 1): at most size "
                                "of them, and per class at most guidance_val_fraction of its hard images, never "
                                "all (docs/fidelity.md).")
    probe_steps: Optional[int] = Field(None, ge=1, description="Adaptive: cap on optimizer steps over D per probe.")
    guidance_val_fraction: float = Field(
        0.25, gt=0, lt=1, description="Adaptive: per class, the most share of its real hard images held out of "
                                      "training to form V: ⌊fraction · n_c⌋, at most n_c − 1 (a class with one "
                                      "keeps it); when that is 0 for every class, one image of the class with "
                                      "the most. With |V| = 2,000 on the paper's data the size cap binds first "
                                      "(≈ 3 % of iWildCam's hard images).")
    image_size: Optional[int] = Field(None, ge=8, description="Training image side (None = dataset.image_size).")
    eval_batch_size: int = Field(256, ge=1, description="Images per forward pass in evaluation.")
    input_pipeline: Literal["auto", "toy", "resnet", "clip"] = Field(
        "auto", description="Augmentation/normalisation recipe (training/transforms.py); auto = the backbone's: "
                            "small_cnn → toy (square resize, [0, 1]), resnet10 → resnet (RandomResizedCrop + "
                            "flip + colour jitter; Resize + CenterCrop at eval; ImageNet mean/std), clip → the "
                            "open_clip model's own preprocess.")
    color_jitter: float = Field(0.4, ge=0, le=1, description="resnet pipeline: brightness/contrast/saturation "
                                                             "jitter at training (0 = off).")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="resnet pipeline: RandomResizedCrop area range.")
    resize_size: Optional[int] = Field(None, ge=8, description="resnet pipeline: eval Resize side "
                                                               "(None = image_size × 256/224).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="CUDA only: bf16 autocast, or fp16 autocast with a GradScaler; fp32 keeps TF32 "
                            "matmuls on. Ignored (fp32) on CPU workers.")
    image_cache_mb: int = Field(512, ge=0, description="Decode every image into worker memory when the decoded "
                                                       "set fits this many MiB (small datasets, e.g. the toy "
                                                       "world); else stream from parquet through Ray Data. "
                                                       "0 = always stream.")
    data_cpus: float = Field(0.25, gt=0, description="Image stream: decode CPUs per rank (ceil = reader actors "
                                                     "per rank, started once per run); the cluster must keep "
                                                     "them free beside the Train workers.")
    prepared_images: bool = Field(False, description="Image stream: train on a copy of the real images prepared "
                                                     "once at the training resolution (the base resize, JPEG "
                                                     "quality 95 4:4:4, written by `discl train` through Ray "
                                                     "Data into <run_root>/<experiment>/prepared/) instead of "
                                                     "decoding the originals every epoch. toy and resnet input "
                                                     "pipelines.")
    prefetch_batches: int = Field(2, ge=0, description="Batches the image stream decodes ahead of training.")
    shuffle_buffer: int = Field(1024, ge=0, description="Streamed training rows: seeded local shuffle buffer "
                                                        "(rows of uint8 images held by the worker; 0 = off).")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept in storage: the best by select_metric "
                                                  "(and always the latest).")
    wise_alphas: list[float] = Field([], description="WiSE-FT mixing coefficients to evaluate (CLIP backbone).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Train worker (fractional on small machines).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per Train worker.")
    max_failures: int = Field(2, ge=0, description="Worker-failure restarts (FailureConfig).")
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend of the Train workers: auto = nccl when workers hold GPUs, "
                            "else gloo (Ray Train's rule). gloo on GPU workers runs the collectives on the CPU; "
                            "`discl rehearse` picks it when a GPU node shows no CUDA device.")
    checkpoint_every: int = Field(
        1, ge=1, description="Epochs between checkpoints (the first and last epoch always get one). A restart "
                             "re-runs the epochs since the last checkpoint; MLflow gets an epoch's metrics "
                             "once its checkpoint is reported. Raise it when epochs take well under a second.")
    seed: int = Field(0, description="Seed for init, sampling and the random strategy.")
    select_metric: str = Field("val_acc", description="Validation metric for model selection (never the test split).")

    @field_validator("lams")
    @classmethod
    def _lams(cls, v):
        return check_lams(v, "training.lams")

    @field_validator("wise_alphas")
    @classmethod
    def _alphas(cls, v):
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"every WiSE-FT alpha must lie in [0, 1]; got {bad}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.curriculum_epochs > self.epochs:
            raise ValueError(f"training.curriculum_epochs ({self.curriculum_epochs}) must be <= "
                             f"training.epochs ({self.epochs})")
        if self.strategy == "fixed" and self.fixed_lam is None:
            raise ValueError("training.strategy=fixed needs training.fixed_lam")
        if self.strategy == "text_only" and 0.0 not in self.lams:
            raise ValueError("training.strategy=text_only needs 0.0 in training.lams")
        if self.strategy == "fixed" and self.fixed_lam not in self.lams:
            raise ValueError(f"training.fixed_lam ({self.fixed_lam}) must be one of training.lams {self.lams}")
        if self.loss == "flyp" and self.backbone != "clip":
            raise ValueError("training.loss=flyp needs training.backbone=clip")
        if self.flyp_templates and (self.loss != "flyp" or self.strategy == "adaptive"):
            raise ValueError("training.flyp_templates (FLYP's captions) need training.loss=flyp and a strategy "
                             "other than adaptive (its probe trains one caption per class)")
        if any("{name}" not in t for t in self.flyp_templates):
            raise ValueError(f"every training.flyp_templates entry needs {{name}}; got {self.flyp_templates}")
        if self.lr_schedule == "cosine_steps" and self.strategy != "none":
            raise ValueError("training.lr_schedule=cosine_steps needs training.strategy=none (the per-step cosine "
                             "needs the run's step total before it starts; a curriculum epoch's size depends "
                             "on its λ)")
        if self.crop_scale[0] <= 0 or self.crop_scale[0] > self.crop_scale[1] or self.crop_scale[1] > 1:
            raise ValueError(f"training.crop_scale must satisfy 0 < min <= max <= 1; got {list(self.crop_scale)}")
        if self.prepared_images and (self.input_pipeline == "clip"
                                     or (self.input_pipeline == "auto" and self.backbone == "clip")):
            raise ValueError("training.prepared_images supports the toy and resnet input pipelines, not clip (its "
                             "resize comes from the open_clip model's preprocess config); set it to false")
        if self.input_pipeline == "clip" and self.backbone != "clip":
            raise ValueError("training.input_pipeline=clip needs training.backbone=clip")
        if (self.head != "zero_shot" or self.lp_epochs) and self.backbone != "clip":
            raise ValueError("training.head / training.lp_epochs (LP-FT) need training.backbone=clip")
        if self.lp_epochs and self.head != "linear":
            raise ValueError("training.lp_epochs (linear probing) needs training.head=linear")
        if self.lp_epochs >= self.epochs:
            raise ValueError(f"training.lp_epochs ({self.lp_epochs}) must be < training.epochs ({self.epochs})")
        if self.head == "linear" and self.loss == "flyp":
            raise ValueError("training.head=linear trains with ce (LP-FT); flyp contrasts with the text tower")
        if self.init_from and self.init_checkpoint:
            raise ValueError("give training.init_from or training.init_checkpoint, not both")
        if self.wise_alphas and self.backbone != "clip":
            raise ValueError("training.wise_alphas (WiSE-FT) needs training.backbone=clip")
        valid = SELECT_METRICS[self.task]
        if "select_metric" not in self.model_fields_set and self.select_metric != valid[0]:
            # The default names the long-tail metric; low-quality runs select on macro-F1 unless told.
            object.__setattr__(self, "select_metric", valid[0])
        if self.select_metric not in valid:
            raise ValueError(f"training.select_metric for task={self.task} must be one of {list(valid)} "
                             f"(validation metrics only; got {self.select_metric!r})")
        return self
