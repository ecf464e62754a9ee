"""`discl prompts --llm`: per-class diverse prompts from an LLM with the paper's query (A.1.2), on Ray Data LLM.

A.1.2 asks GPT-3.5-turbo, for every ImageNet-LT class X: "Please provide 10 language descriptions for random
scenes that contain only the class X from the ImageNet-LT dataset. Each description should be different and
contain a minimum of 15 words. …" (``prompts.llm.query``). One request per class goes through ``ray.data.llm``:

* ``engine: http`` - the HTTP request processor against any OpenAI-compatible ``/chat/completions`` endpoint
  (OpenAI, a vLLM or SGLang server, a gateway); ``prompts.llm.url`` names it, the bearer token comes from the
  environment variable ``prompts.llm.api_key_env``;
* ``engine: vllm`` - a vLLM engine on GPU workers (``prompts.llm.vllm``: model source, engine arguments,
  accelerator type, replicas); the cluster image needs ``vllm``.

Answers are split into one description per line (numbering and bullets removed) and written as the JSON
``{class_name: [description, …]}`` that ``prompts.prompts_file`` reads. Results are cached under
``<cache>/llm_prompts/<key>.json``, the key hashing the model, the query settings and the class names, so a
rerun (or another experiment with the same classes) sends no request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from discl_ray.errors import MissingInput, UserError

log = logging.getLogger(__name__)

DATASET_NAMES = {"imagenet_lt": "ImageNet-LT", "cifar100_lt": "CIFAR-100-LT", "inat2018": "iNaturalist 2018",
                 "iwildcam": "iWildCam", "digits_lt": "digits", "digits_lq": "digits", "digits_world": "digits"}
_BULLET = re.compile(r"^\s*(?:\(?\d+[.):]|[-*•])\s*")


class LLMUnavailable(UserError):
    """No endpoint or engine is configured, or the endpoint does not answer."""


def _write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so an interrupted run never leaves half a JSON (or a bad cache)."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def check_engine(llm) -> None:
    """Fail before any cluster work when nothing could answer the queries."""
    if llm.engine == "vllm":
        if not llm.vllm.model_source:
            raise LLMUnavailable("prompts.llm.engine=vllm needs prompts.llm.vllm.model_source (a model id or path)")
        return
    if not llm.url:
        raise LLMUnavailable("--llm needs an LLM: set prompts.llm.url to an OpenAI-compatible endpoint (e.g. "
                             "http://127.0.0.1:8000/v1) or prompts.llm.engine=vllm with prompts.llm.vllm.model_source")
    parsed = urlparse(chat_url(llm.url))
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LLMUnavailable(f"prompts.llm.url: expected an http(s) URL, got {llm.url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as err:
        raise LLMUnavailable(f"prompts.llm.url: cannot reach {parsed.hostname}:{port} ({err})") from None


def parse_descriptions(text: str, n: int) -> list[str]:
    """One description per non-empty line, numbering/bullets/quotes stripped, de-duplicated, at most ``n``."""
    out: list[str] = []
    for line in (text or "").splitlines():
        line = _BULLET.sub("", line).strip().strip('"').strip()
        if line and line not in out:
            out.append(line)
    return out[:n]


def cache_key(llm, names: list[str], dataset: str) -> str:
    model = llm.vllm.model_source if llm.engine == "vllm" else llm.model
    spec = {"engine": llm.engine, "model": model, "query": llm.query, "n": llm.n_descriptions,
            "min_words": llm.min_words, "temperature": llm.temperature, "max_tokens": llm.max_tokens,
            "dataset": dataset, "classes": names}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _processor(llm):
    from ray.data.llm import build_processor

    messages = lambda row: [{"role": "user", "content": row["query"]}]  # noqa: E731
    if llm.engine == "vllm":
        from ray.data.llm import vLLMEngineProcessorConfig

        v = llm.vllm
        config = vLLMEngineProcessorConfig(model_source=v.model_source, engine_kwargs=dict(v.engine_kwargs),
                                           concurrency=v.concurrency, batch_size=v.batch_size,
                                           accelerator_type=v.accelerator_type)
        return build_processor(
            config,
            preprocess=lambda row: dict(messages=messages(row), sampling_params=dict(
                temperature=llm.temperature, max_tokens=llm.max_tokens)),
            postprocess=lambda row: dict(class_name=row["class_name"], text=row["generated_text"]))
    import os

    from ray.data.llm import HttpRequestProcessorConfig

    token = os.environ.get(llm.api_key_env) if llm.api_key_env else None
    config = HttpRequestProcessorConfig(url=chat_url(llm.url), headers={"Authorization": f"Bearer {token}"}
                                        if token else None, concurrency=llm.concurrency, qps=llm.qps,
                                        batch_size=llm.batch_size, max_retries=llm.max_retries)
    return build_processor(
        config,
        preprocess=lambda row: dict(payload=dict(model=llm.model, messages=messages(row),
                                                 temperature=llm.temperature, max_tokens=llm.max_tokens)),
        postprocess=lambda row: dict(class_name=row["class_name"],
                                     text=row["http_response"]["choices"][0]["message"]["content"]))


def _classes(cfg, paths) -> dict[str, str]:
    """class_name -> display name of the classes to query (all, or those with mined hard images)."""
    from discl_ray import data
    from discl_ray.prompts.templates import display_names

    names = data.class_names(data.read_rows(cfg, paths=paths))
    if cfg.prompts.llm.classes == "hard":
        from discl_ray.runtime.io import read_parquet_dir

        try:
            hard = set(read_parquet_dir(paths.stage("mine"), ["label"])["label"].to_pylist())
        except FileNotFoundError:
            raise MissingInput("prompts.llm.classes=hard needs the hard-sample table (run discl mine first)") \
                from None
        names = {k: v for k, v in names.items() if k in hard}
    ordered = [names[k] for k in sorted(names)]
    return dict(zip(ordered, display_names(ordered, cfg.prompts)))


def llm_prompt_file(ctx, out: Optional[Path] = None) -> tuple[Path, dict[str, Any]]:
    """Query (or reuse the cache for) every class; write the prompts JSON; returns (path, summary). ``ctx``: the
    stage's context (a bare config opens one)."""
    from discl_ray.runtime.context import StageContext

    ctx = StageContext.of(ctx, "prompts")
    cfg, paths = ctx.cfg, ctx.paths
    llm = cfg.prompts.llm
    check_engine(llm)
    classes = _classes(cfg, paths)
    dataset = llm.dataset_name or DATASET_NAMES.get(cfg.dataset.name, cfg.dataset.name)
    cache = paths.cache / "llm_prompts" / f"{cache_key(llm, sorted(classes), dataset)}.json"
    summary: dict[str, Any] = {"classes": len(classes), "cached": cache.is_file(), "cache": str(cache)}
    if cache.is_file():
        answers = json.loads(cache.read_text())
    else:
        import ray

        ctx.init_ray()
        rows = [{"class_name": c, "query": llm.query.format(n=llm.n_descriptions, name=d, dataset=dataset,
                                                            min_words=llm.min_words)} for c, d in classes.items()]
        log.info("querying %d classes (%s %s)", len(rows), llm.engine, llm.model if llm.engine == "http"
                 else llm.vllm.model_source)
        done = _processor(llm)(ray.data.from_items(rows)).take_all()   # Ray Data shows per-stage progress
        answers = {r["class_name"]: r["text"] for r in done}
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_text(cache, json.dumps(answers, indent=1, sort_keys=True))
    prompts = {c: parse_descriptions(answers.get(c, ""), llm.n_descriptions) for c in classes}
    summary["short"] = sorted(c for c, p in prompts.items() if len(p) < llm.n_descriptions)
    summary["descriptions"] = sum(len(p) for p in prompts.values())
    out = Path(out) if out else paths.stage("llm_prompts", "prompts.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_text(out, json.dumps(prompts, indent=1, ensure_ascii=False))
    return out, summary
