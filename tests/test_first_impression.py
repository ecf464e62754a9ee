"""What a newcomer sees: result cells with one seed, a bench's --json file that cannot be merged into, and no
error-level line from Ray's core on the console of `discl quickstart` (issue 33)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from discl_ray.report.tables import format_table, to_markdown

REPO = Path(__file__).resolve().parent.parent


# -- result tables: one seed has no standard deviation --------------------------------------------------------------
def _table(n: list[int]) -> pd.DataFrame:
    rows = []
    for i, k in enumerate(n):
        row = {"training.strategy": f"s{i}", "n": k}
        for label in ("many", "medium", "few", "overall"):
            row[f"{label}_mean"], row[f"{label}_std"] = 0.98889, (0.0 if k == 1 else 0.0123)
        rows.append(row)
    return pd.DataFrame(rows)


def test_one_seed_shows_the_value_alone():
    shown = format_table(_table([1, 3]), "long_tail")
    assert shown.loc[0, "few"] == "98.89"                       # n = 1: no "± 0.00"
    assert shown.loc[1, "few"] == "98.89 ± 1.23"                # n ≥ 2: mean ± sample std, as before
    md = to_markdown(shown)
    assert "± 0.00" not in md and "| s0 | 1 | 98.89 | 98.89 | 98.89 | 98.89 |" in md


def test_two_seeds_with_equal_values_keep_their_zero_spread():
    df = _table([2])
    for label in ("many", "medium", "few", "overall"):
        df[f"{label}_std"] = 0.0
    assert format_table(df, "long_tail").loc[0, "overall"] == "98.89 ± 0.00"   # a measured spread of 0


# -- a bench's --json file: merged into, or one line and exit 2 --------------------------------------------------
def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "discl_ray.cli", "bench", "train-memory", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize("content, says", [("", "is empty"), ("  \n", "is empty"),
                                           ('{"fixed-n": {"n_tr', "is not JSON"), ("[1, 2]", "JSON list")])
def test_bench_json_that_cannot_be_merged_into_is_one_line_and_exit_2(tmp_path, content, says):
    path = tmp_path / "bench.json"                  # as `mktemp` leaves it, or cut short, or not an object
    path.write_text(content)
    res = _bench("--pieces", "fixed-n", "--run-root", str(tmp_path / "root"), "--json", str(path))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("discl bench train-memory: --json ") and str(path) in lines[0] and says in lines[0]
    assert path.read_text() == content                                # left as it was
    assert not (tmp_path / "root").exists()                           # stopped before any work


def test_bench_json_helper_reads_what_an_earlier_piece_wrote(tmp_path):
    from discl_ray.runtime.io import MergeFileError, read_json_to_merge

    assert read_json_to_merge(tmp_path / "new.json") == {}              # no file yet: a new one
    (tmp_path / "old.json").write_text('{"fixed-n": {"n_train": 5000}}')
    assert read_json_to_merge(tmp_path / "old.json") == {"fixed-n": {"n_train": 5000}}
    with pytest.raises(MergeFileError, match="is a folder"):
        read_json_to_merge(tmp_path)
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(MergeFileError, match="cannot read"):
        read_json_to_merge(tmp_path / "bad.json")


# -- no error-level line from Ray's C++ core on the console ----------------------------------------------------------
# Ray's core worker prints this once per process, at error level, on descriptor 2, for the first actor created with
# arguments in the object store and restarts on: every Ray Data actor pool (generate, score, mine) is one.
RAY_CORE_ERROR = re.compile(r"\[[^\]\n]* E \d+ \d+\] \w+\.cc:\d+:")

_POOL_SCRIPT = r"""
import sys

import ray

from discl_ray.runtime import logs

ray.init(address=sys.argv[1], log_to_driver=False)


class Same:
    def __call__(self, batch):
        return batch


with open(sys.argv[2], "a", encoding="utf-8") as log, logs.native_stderr_to(log):
    print("a warning for the person at the console", file=sys.stderr)
    rows = ray.data.range(4).map_batches(Same, batch_size=2, num_cpus=0.25,
                                         compute=ray.data.ActorPoolStrategy(size=1)).take_all()
print("rows", len(rows))
"""


def test_ray_core_error_line_goes_to_the_log_not_the_console(tmp_path, ray_local):
    """A fresh driver (the line is once per process) runs a Ray Data actor pool inside logs.native_stderr_to, as
    `discl quickstart` runs its stages: the console (its stderr) has no line from Ray's C++ core, Python's
    stderr still reaches it, and the line is in the log file (so this run did print it)."""
    log = tmp_path / "quickstart.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, ray_local.get_runtime_context().gcs_address, str(log)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0 and "rows 4" in res.stdout, res.stderr[-3000:]
    assert not RAY_CORE_ERROR.search(res.stderr + res.stdout), res.stderr[-3000:]
    assert "a warning for the person at the console" in res.stderr
    logged = log.read_text()
    assert RAY_CORE_ERROR.search(logged) and "constructor arguments in the object store" in logged, (
        "Ray's core no longer prints its note on actor-pool restarts: logs.native_stderr_to's reason is gone")
