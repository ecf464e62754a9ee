"""The `discl` console script: help lists every stage; stages run from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq

from discl_ray.cli import COMMANDS, main


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("world", "mine", "prompts", "generate", "score", "train", "sweep", "report", "submit",
                 "quickstart", "bench"):
        assert name in COMMANDS and name in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "discl_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_unknown_command_fails():
    out = subprocess.run([sys.executable, "-m", "discl_ray.cli", "frobnicate"], capture_output=True, text=True)
    # a refusal (argparse's usage error, exit 2), not a crash that happens to print the words
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "choose from:" in out.stderr


def test_bad_config_fails_before_work(tmp_path, capsys):
    rc = main(["mine", f"run_root={tmp_path}", "training.strategy=nope"])
    assert rc == 2
    assert "training.strategy" in capsys.readouterr().err
    assert not (tmp_path / "toy_lt").exists()


def test_prompts_and_mine_from_cli(tmp_path):
    assert main(["prompts", f"run_root={tmp_path}"]) == 0
    assert main(["mine", f"run_root={tmp_path}"]) == 0
    hard = pq.read_table(next((tmp_path / "toy_lt" / "mine").glob("*.parquet")))
    assert hard.num_rows > 0 and set(hard["group"].to_pylist()) == {"few"}
    prompts = pq.read_table(next((tmp_path / "toy_lt" / "prompts").glob("*.parquet")))
    assert prompts.num_rows == 10
