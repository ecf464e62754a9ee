"""Schemas for the dataset, hard-sample mining and prompt stages."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from discl_ray.config.base import StrictModel

DatasetName = Literal["digits_lt", "digits_lq", "digits_world", "imagenet_lt", "cifar100_lt",
                      "inat2018", "iwildcam"]
Corruption = Literal["clean", "blur", "noise", "occlusion", "low_contrast", "pixelate"]


class ToyDataConfig(StrictModel):
    """Knobs of the built-in digits toy world (scikit-learn's bundled 8x8 digits)."""

    n_max: int = Field(50, ge=1, description="Training images of the most frequent class (digits-LT).")
    val_per_class: int = Field(5, ge=1, description="Balanced validation images per class (model selection).")
    test_per_class: int = Field(30, ge=1, description="Balanced test images per class (reporting only).")
    world_fraction: float = Field(0.5, gt=0, lt=1,
                                  description="Share of digits kept as the 'world' split for toy model pre-training.")
    id_styles: list[Corruption] = Field(["blur", "noise", "occlusion"], min_length=1,
                                        description="digits-LQ corruption styles seen in training (ID domains).")
    ood_styles: list[Corruption] = Field(["low_contrast", "pixelate"], min_length=1,
                                         description="digits-LQ styles only in the OOD test split.")
    severity: float = Field(0.6, ge=0, le=1, description="Corruption strength in [0, 1].")
    lq_ood_per_class: int = Field(15, ge=1, description="digits-LQ OOD test images per class.")
    world_seed: Optional[int] = Field(
        None, ge=0, description="Seed of the world/task partition of the digits, which `discl world` trains the toy "
                                "models on (None = dataset.seed). Set it to keep one world while dataset.seed "
                                "varies the task's own split and sampling (`discl bench replicate --vary data`).")
    look: Literal["clean", "blueprint", "paper"] = Field(
        "clean", description="Camera look of the task's real images (digits-LT/LQ, every split): 'clean' = the "
                             "world's white-on-black; 'blueprint' = white lines on blue textured paper, the gap "
                             "world's synthetic-to-real gap; 'paper' = dark ink on tinted paper (inverted polarity: "
                             "a harder gap, whose mid-λ images blend two looks).")

    @model_validator(mode="after")
    def _disjoint_styles(self):
        overlap = set(self.id_styles) & set(self.ood_styles)
        if overlap:
            raise ValueError(f"toy.id_styles and toy.ood_styles must be disjoint; both hold {sorted(overlap)}")
        return self


class DatasetConfig(StrictModel):
    """Which dataset feeds the pipeline and how canonical rows are built from it."""

    name: DatasetName = Field("digits_lt", description="Dataset loader; digits_* are the built-in toy world.")
    root: Optional[str] = Field(None, description="On-disk root of a real dataset (unused for the toy world).")
    seed: int = Field(0, description="Seed for every random split/sampling the loader does.")
    image_size: int = Field(32, ge=8, le=4096, description="Toy images are upsampled to this side (pixels).")
    imbalance_ratio: float = Field(30.0, ge=1.0,
                                   description="n_max / n_min for synthetically long-tailed sets (digits-LT, CIFAR-100-LT).")
    val_per_class: Optional[int] = Field(None, ge=1,
                                         description="Real datasets: validation images per class held out of train "
                                                     "(None = the loader's default: CIFAR 10, iNat 1).")
    embed_images: bool = Field(False, description="Real datasets: embed PNG bytes in parquet instead of paths.")
    max_classes: Optional[int] = Field(None, ge=1, description="Keep only this many classes (those with the most "
                                                               "training images; labels renumbered 0..K-1). "
                                                               "`discl rehearse` sets it; None = all classes.")
    max_per_class: Optional[int] = Field(None, ge=1, description="Keep at most this many images per class and split "
                                                                 "(the first by image_id). None = all.")
    miniature_groups: Optional[tuple[int, int]] = Field(
        None, description="(few_max, many_min), set by `discl rehearse` for frequency-mined long-tail configs: when "
                          "the kept classes' capped training counts leave the few, medium or many group empty (on a "
                          "real long-tail dataset the biggest classes all reach max_per_class), their training rows "
                          "are capped on a descending profile instead (a third each at max_per_class, between the "
                          "bounds, below few_max). None = max_per_class for every class.")
    toy: ToyDataConfig = Field(default_factory=ToyDataConfig)


class MiningConfig(StrictModel):
    """Hard-sample mining: which training images get a synthetic spectrum."""

    mode: Literal["frequency", "confidence"] = Field(
        "frequency", description="frequency: tail classes of a long-tailed set; confidence: low true-class probability.")
    few_max: int = Field(20, ge=1, description="Classes with fewer training images than this are 'few' (tail).")
    many_min: int = Field(101, ge=2, description="Classes with at least this many training images are 'many' "
                                                 "(Liu et al. 2019: more than 100, so 101).")
    hard_groups: list[Literal["few", "medium", "many"]] = Field(
        ["few"], min_length=1, description="frequency mode: class groups whose training images are hard.")
    classifier: Literal["open_clip_zero_shot", "torchscript", "toy", "toy-gap", "trained_run"] = Field(
        "open_clip_zero_shot",
        description="confidence mode: zero-shot CLIP (scoring.model), a TorchScript file, the toy-world judge "
                    "(toy; toy-gap: the gap world's), or "
                    "a classifier trained on the dataset (trained_run: the run named by classifier_from, §3.3).")
    classifier_from: Optional[str] = Field(
        None, description="classifier=trained_run: '<experiment>[/<run name>]' whose best-on-validation model "
                          "mines (the FLYP baseline for iWildCam); built with this config's training backbone.")
    classifier_path: Optional[str] = Field(None, description="confidence mode with torchscript: the .pt file.")
    threshold: Optional[float] = Field(None, ge=0, le=1,
                                       description="confidence mode: hard when true-class probability < threshold.")
    lowest_k: Optional[int] = Field(None, ge=1, description="confidence mode: the k least confident images per class.")
    target_count: Optional[int] = Field(None, ge=1, description="confidence mode: the N least confident images "
                                                                "overall (Table 6: 8,260 for iWildCam).")
    class_quantile: Optional[float] = Field(None, gt=0, lt=1, description="confidence mode: per class, images at or "
                                                                          "below this quantile of true-class probability.")
    exclude_classes: list[str] = Field([], description="class_name values never mined (nothing to prompt: "
                                                       "iWildCam's 'empty').")
    batch_size: int = Field(64, ge=1, description="Images per classifier batch in confidence mode.")

    @model_validator(mode="after")
    def _check(self):
        if self.few_max >= self.many_min:
            raise ValueError(f"mining.few_max ({self.few_max}) must be < mining.many_min ({self.many_min})")
        if self.mode == "confidence":
            rules = [k for k in ("threshold", "lowest_k", "target_count", "class_quantile")
                     if getattr(self, k) is not None]
            if len(rules) != 1:
                raise ValueError("mining.mode=confidence needs exactly one of mining.threshold, mining.lowest_k, "
                                 f"mining.target_count or mining.class_quantile (got {rules or 'none'})")
            if self.classifier == "torchscript" and not self.classifier_path:
                raise ValueError("mining.classifier=torchscript needs mining.classifier_path")
            if self.classifier == "trained_run" and not self.classifier_from:
                raise ValueError("mining.classifier=trained_run needs mining.classifier_from (e.g. iwildcam_flyp)")
        return self


PAPER_QUERY = ("Please provide {n} language descriptions for random scenes that contain only the class {name} from "
               "the {dataset} dataset. Each description should be different and contain a minimum of {min_words} "
               "words. These descriptions will serve as a guide for Stable Diffusion in generating images.")


class VLLMEngineConfig(StrictModel):
    """prompts.llm.engine=vllm: a vLLM engine on GPU workers through ray.data.llm (docs/fidelity.md)."""

    model_source: Optional[str] = Field(None, description="Hugging Face id or local/remote path of the model.")
    engine_kwargs: dict = Field(default_factory=dict, description="vLLM engine arguments (max_model_len, …).")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the engine workers (e.g. H100).")
    concurrency: int = Field(1, ge=1, description="Engine replicas (data parallel).")
    batch_size: int = Field(32, ge=1, description="Requests per engine batch.")


class LLMPromptsConfig(StrictModel):
    """`discl prompts --llm`: per-class diverse prompts from an LLM with the paper's query (A.1.2)."""

    engine: Literal["http", "vllm"] = Field("http", description="http: any OpenAI-compatible endpoint (the paper "
                                                                 "used GPT-3.5-turbo); vllm: an engine on GPU workers.")
    url: Optional[str] = Field(None, description="http: endpoint base (…/v1) or its /chat/completions URL.")
    model: str = Field("gpt-3.5-turbo", description="http: model name sent in each request (A.1.2: GPT-3.5-turbo).")
    api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="http: env var holding a bearer token (unset: "
                                                                      "no Authorization header).")
    query: str = Field(PAPER_QUERY, description="The user message; {n}, {name}, {dataset}, {min_words} filled in.")
    dataset_name: Optional[str] = Field(None, description="{dataset} in the query (None = from dataset.name).")
    n_descriptions: int = Field(10, ge=1, description="Descriptions asked for per class (A.1.2: 10).")
    min_words: int = Field(15, ge=1, description="Minimum words per description (A.1.2: 15).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (not stated in the paper).")
    max_tokens: int = Field(1024, ge=16, description="Completion token cap per class.")
    classes: Literal["all", "hard"] = Field("all", description="all: every class (A.1.2 did all 1,000); hard: only "
                                                               "classes with mined hard images.")
    concurrency: int = Field(2, ge=1, description="http: parallel request workers.")
    qps: Optional[int] = Field(None, ge=1, description="http: request rate cap per worker (None = no cap).")
    batch_size: int = Field(16, ge=1, description="Classes per Ray Data batch.")
    max_retries: int = Field(2, ge=0, description="http: retries per request.")
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig)


class PromptsConfig(StrictModel):
    """Prompt construction: templates, name maps and per-class prompt lists."""

    template: str = Field("a photo of {name}", description="Generation prompt template; {name} = display name.")
    clip_template: str = Field("a photo of {name}", description="CLIP filter prompt template (paper: per dataset).")
    name_map: Optional[str] = Field(None, description="JSON file mapping class_name (e.g. scientific) -> common name.")
    prompts_file: Optional[str] = Field(None, description="JSON file {class_name: [prompt, ...]} of diverse prompts.")
    include_template: bool = Field(True, description="Keep the template prompt beside the per-class JSON prompts.")
    llm: LLMPromptsConfig = Field(default_factory=LLMPromptsConfig,
                                  description="`discl prompts --llm`: write prompts_file from an LLM (A.1.2).")

    @model_validator(mode="after")
    def _check(self):
        for key in ("template", "clip_template"):
            if "{name}" not in getattr(self, key):
                raise ValueError(f"prompts.{key} must contain '{{name}}' (got {getattr(self, key)!r})")
        if not self.include_template and not self.prompts_file:
            raise ValueError("prompts.include_template=false needs prompts.prompts_file")
        return self
