"""`discl bench NAME [args]`: run a benchmark (generate, score, train, train-memory, replicate, scaling, gpu)."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "generate": "discl_ray.bench.generate",
    "score": "discl_ray.bench.score",
    "train": "discl_ray.bench.train",
    "train-memory": "discl_ray.bench.train_memory",
    "train-io": "discl_ray.bench.train_io",
    "replicate": "discl_ray.bench.replicate",
    "scaling": "discl_ray.bench.scaling",
    "gpu": "discl_ray.bench.gpu",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: discl bench {" + ",".join(BENCHES) + "} [--json PATH] [options]\n\n"
              "Benchmarks print a table and, with --json PATH, write their numbers as JSON.\n"
              "Results and machines are recorded in docs/benchmarks.md.")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHES:
        print(f"discl bench: unknown benchmark {name!r}; choose from: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BENCHES[name])
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("discl_ray.bench"):
            print(f"discl bench {name}: not implemented yet; nothing was run.", file=sys.stderr)
            return 3
        raise
    return int(module.main(argv[1:]) or 0)
