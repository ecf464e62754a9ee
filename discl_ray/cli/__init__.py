"""The ``discl`` console script: one subcommand per stage, each a thin ``jobs/<stage>.py:main(argv)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of the data path.
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("jobs.world", "train the toy world's generator and CLIP on the digits world split"),
    "mine": ("jobs.mine", "mine hard samples (frequency- or confidence-based)"),
    "prompts": ("jobs.prompts", "build the per-class prompt table"),
    "generate": ("jobs.generate", "generate the synthetic-to-real spectrum (diffusers img2img on Ray Data)"),
    "score": ("jobs.score", "CLIP-score and filter the spectrum (open_clip on Ray Data)"),
    "train": ("jobs.train", "curriculum training on Ray Train with a λ selector"),
    "sweep": ("jobs.sweep", "Ray Tune sweep over curricula, thresholds, λ sets, seeds"),
    "report": ("jobs.report", "paper-style tables and plots from MLflow"),
    "gc": ("jobs.gc", "drop spectrum-store keys that no experiment uses"),
    "ui": ("jobs.ui", "serve the MLflow UI on 127.0.0.1 over the run's store"),
    "pipeline": ("jobs.pipeline", "run several stages in order in one process, stopping at the first failure"),
    "rehearse": ("jobs.rehearse", "a config's whole pipeline in miniature on its cluster, storage and MLflow"),
    "submit": ("jobs.submit", "submit a stage as a Ray job to a cluster"),
    "quickstart": ("jobs.quickstart", "the whole method on the toy world"),
    "bench": ("jobs.bench", "benchmarks: generate, score, train, replicate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discl",
        description="Diffusion Curriculum (DisCL) on Ray. Each stage reads and writes parquet under "
                    "runs/<experiment>/ and takes --config FILE plus dotted key=value overrides.",
        epilog="Run 'discl <command> --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


