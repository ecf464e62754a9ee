"""`discl prompts --llm` through Ray Data LLM against a local OpenAI-compatible server started by the test.

The server answers /v1/chat/completions with text sampled from a tiny randomly initialised transformers GPT-2
(word-level vocabulary with line breaks, seeded by the request): the plumbing is what is tested - the paper's
query per class, one request per class through ray.data.llm's HTTP processor, parsing, cache, errors.
"""

from __future__ import annotations

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from discl_ray.config import load_config
from discl_ray.prompts.llm import parse_descriptions

REPO = Path(__file__).resolve().parents[1]
WORDS = ["\n", "1.", "2.", "a", "digit", "drawn", "on", "paper", "in", "the", "park", "with", "soft", "light",
         "chalk", "board", "near", "window", "bright", "red", "ink", "sketch", "of", "number", "beside", "tree"]


class TinyChatModel:
    """A random GPT-2 over WORDS: the stand-in for an LLM behind the endpoint."""

    def __init__(self):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=128, n_embd=32, n_layer=2,
                                                n_head=2, bos_token_id=3, eos_token_id=2)).eval()
        self.lock = threading.Lock()

    def reply(self, prompt: str, max_tokens: int) -> str:
        import torch

        ids = [zlib.crc32(w.encode()) % len(WORDS) for w in prompt.split()][-32:] or [3]
        with self.lock, torch.no_grad():
            torch.manual_seed(zlib.crc32(prompt.encode()))
            out = self.model.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=min(max_tokens, 48),
                                      min_new_tokens=min(max_tokens, 48), pad_token_id=0)
        return " ".join(WORDS[i] for i in out[0, len(ids):].tolist()).replace(" \n ", "\n")


@pytest.fixture(scope="module")
def server():
    model = TinyChatModel()
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self.path.endswith("/chat/completions"):
                self.send_error(404)
                return
            content = model.reply(body["messages"][-1]["content"], int(body.get("max_tokens", 48)))
            seen.append({"body": body, "content": content, "auth": self.headers.get("Authorization")})
            data = json.dumps({"id": f"c{len(seen)}", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()
    httpd.server_close()


def test_parse_descriptions():
    text = '1. A red seven on a chalk board.\n\n2) "A seven in the park."\n- A red seven on a chalk board.\n* third'
    assert parse_descriptions(text, 10) == ["A red seven on a chalk board.", "A seven in the park.", "third"]
    assert parse_descriptions(text, 2) == ["A red seven on a chalk board.", "A seven in the park."]


def test_prompts_llm_queries_every_class_once_and_caches(server, tmp_path, ray_private, monkeypatch, capsys):
    from jobs.prompts import main

    url, seen = server
    monkeypatch.setenv("DISCL_TEST_LLM_KEY", "sk-test")
    args = ["--config", str(REPO / "configs/toy/digits_lt.yaml"), "--llm", f"run_root={tmp_path}",
            f"prompts.llm.url={url}", "prompts.llm.n_descriptions=3", "prompts.llm.max_tokens=40",
            "prompts.llm.concurrency=1", "prompts.llm.batch_size=4", "prompts.llm.api_key_env=DISCL_TEST_LLM_KEY"]
    before = len(seen)
    assert main(args) == 0
    new = seen[before:]
    assert len(new) == 10                                          # one request per class
    queries = {r["body"]["messages"][0]["content"]: r for r in new}
    q7 = ("Please provide 3 language descriptions for random scenes that contain only the class seven from the "
          "digits dataset. Each description should be different and contain a minimum of 15 words. These "
          "descriptions will serve as a guide for Stable Diffusion in generating images.")
    assert q7 in queries and queries[q7]["body"]["model"] == "gpt-3.5-turbo"
    assert queries[q7]["auth"] == "Bearer sk-test"
    out = tmp_path / "toy_lt" / "llm_prompts" / "prompts.json"
    prompts = json.loads(out.read_text())
    assert set(prompts) == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert prompts["seven"] == parse_descriptions(queries[q7]["content"], 3) and prompts["seven"]
    from discl_ray.runtime.io import read_parquet_dir

    table = read_parquet_dir(tmp_path / "toy_lt" / "prompts").to_pylist()
    seven = next(r for r in table if r["class_name"] == "seven")
    assert seven["gen_prompts"][0] == "a photo of the digit seven" and seven["gen_prompts"][1:] == prompts["seven"]
    assert "queried" in capsys.readouterr().out
    # Cached by (model, classes): the same run sends nothing; another model asks again.
    assert main(args) == 0 and len(seen) == before + 10
    assert "from the cache" in capsys.readouterr().out
    from discl_ray.prompts.llm import cache_key

    llm = load_config(None, ["prompts.llm.model=other-model"]).prompts.llm
    assert cache_key(llm, ["seven"], "digits") != cache_key(load_config(None).prompts.llm, ["seven"], "digits")


def test_clear_errors_without_an_endpoint(tmp_path, capsys):
    from jobs.prompts import main

    base = ["--config", str(REPO / "configs/toy/digits_lt.yaml"), "--llm", f"run_root={tmp_path}"]
    assert main(base) == 2
    assert "discl prompts: --llm needs an LLM: set prompts.llm.url" in capsys.readouterr().err
    assert main(base + ["prompts.llm.url=http://127.0.0.1:9/v1"]) == 2
    assert "cannot reach 127.0.0.1:9" in capsys.readouterr().err
    assert main(base + ["prompts.llm.engine=vllm"]) == 2
    assert "prompts.llm.vllm.model_source" in capsys.readouterr().err


def test_imagenet_lt_names_from_open_clip():
    from discl_ray.data.loaders.imagenet_lt import imagenet_names

    names = imagenet_names(1000)
    assert names[0] == "tench" and names[17] == "jay" and len(set(names.values())) >= 990
    assert imagenet_names(1002)[1001] == "class_1001"
