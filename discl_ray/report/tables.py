"""Paper-style result tables and plots from MLflow runs (mean ± std over seeds).

A finished training run carries final test metrics (see ``discl_ray.training.fit``). Runs are grouped by the
params that *differ* between runs minus the seed params, so each table row is one configuration (strategy,
loss, λ set, …) and each cell is the mean ± std over that configuration's seeds:

- long-tail:  columns many / medium / few / overall accuracy (paper Tables 1–2);
- low-quality: columns OOD / ID macro-F1 (paper Table 3).

``build_tables`` returns numeric DataFrames (``<col>_mean``, ``<col>_std``, ``n``) so callers and tests can
check values; ``write_report`` renders Markdown and CSV, draws the plots and logs everything to a report run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from discl_ray.errors import UserError
from discl_ray.report.wise import TABLES, _std, add_we_rows
from discl_ray.runtime.tracking import use_uri

if TYPE_CHECKING:
    from discl_ray.runtime.storage import Storage

log = logging.getLogger(__name__)

# Params that distinguish repetitions, not configurations.
SEED_PARAMS = ("training.seed",)
# Params that never define a configuration (paths, bookkeeping).
IGNORED_PARAMS = ("run_root", "cache_dir", "tracking.", "ray.", "sweep.")


def _is_seed(key: str) -> bool:
    return key in SEED_PARAMS or key.endswith(".seed")


def fetch_runs(tracking_uri: str, experiment: str, parent_run_id: Optional[str] = None) -> pd.DataFrame:
    """All runs of ``experiment`` (optionally only the children of one sweep) as MLflow's DataFrame."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"MLflow experiment {experiment!r} not found at {tracking_uri}; existing: {names}")
    filt = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    use_uri(tracking_uri)
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=filt, output_format="pandas",
                              max_results=50000)


def config_columns(runs: pd.DataFrame) -> list[str]:
    """Param keys whose values differ between runs, minus seeds and bookkeeping (the row identity)."""
    cols = []
    for col in sorted(c for c in runs.columns if c.startswith("params.")):
        key = col[len("params."):]
        if _is_seed(key) or key.startswith(IGNORED_PARAMS):
            continue
        if runs[col].fillna("").astype(str).nunique() > 1:
            cols.append(col)
    return cols


def aggregate(runs: pd.DataFrame, table: str) -> pd.DataFrame:
    """One row per configuration of the runs holding ``table``'s metrics: ``n``, ``<col>_mean/_std``."""
    spec = TABLES[table]
    metric_cols = [f"metrics.{m}" for _, m in spec]
    if any(c not in runs.columns for c in metric_cols):
        return pd.DataFrame()
    done = runs.dropna(subset=metric_cols)
    if done.empty:
        return pd.DataFrame()
    keys = config_columns(done)
    if "params.training.strategy" in done.columns:  # always say which curriculum a row is, first
        keys = ["params.training.strategy", *[k for k in keys if k != "params.training.strategy"]]
    groups = done.fillna({k: "" for k in keys}).groupby(keys, sort=True, dropna=False) if keys else [((), done)]
    rows = []
    for key, grp in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = {k[len("params."):]: v for k, v in zip(keys, key, strict=True)}
        row["n"] = len(grp)
        for label, metric in spec:
            vals = grp[f"metrics.{metric}"].astype(float)
            row[f"{label}_mean"] = float(vals.mean())
            row[f"{label}_std"] = _std(vals)
        rows.append(row)

    return add_we_rows(done, table, pd.DataFrame(rows))   # WiSE-FT runs: a "+ WE" row each


def spectrum_stores(tracking_uri: str, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The spectrum stores the training runs read: ``[{"store", "digest", "runs"}]``, one per distinct
    (store, digest), from each run's MLflow input of context ``spectrum`` (logged by ``discl train`` for a
    curriculum run; a baseline reads no spectrum and has none)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    wanted = set(runs["run_id"])
    if not wanted:
        return []
    # One search over the runs' experiments (its results carry each run's inputs), not one request per run.
    listed, token = [], None
    while True:
        page = client.search_runs(sorted(set(runs["experiment_id"])), max_results=1000, page_token=token)
        listed += [r for r in page if r.info.run_id in wanted]
        token = page.token
        if not token:
            break
    found: dict[tuple[str, str], int] = {}
    for run in listed:
        for given in run.inputs.dataset_inputs or []:
            tags = {t.key: t.value for t in given.tags or []}
            store = tags.get("spectrum_store")
            if tags.get("mlflow.data.context") != "spectrum" or not store:
                continue
            key = (store, tags.get("spectrum_store_digest") or given.dataset.digest)
            found[key] = found.get(key, 0) + 1
    return [{"store": s, "digest": d, "runs": n} for (s, d), n in sorted(found.items())]


def store_lines(stores: list[dict[str, Any]]) -> str:
    """The report's line(s) naming the spectrum store (Markdown), or "" when no run read one."""
    return "".join(f"\nSpectrum store: `{s['store']}` (digest `{s['digest']}`, read by {s['runs']} "
                   f"run{'s' if s['runs'] != 1 else ''})\n" for s in stores)


def _empty_group_hint(runs: pd.DataFrame) -> str:
    """Why finished runs make no table: a group metric that is missing in every finished run (e.g. no class of
    the training set reaches ``mining.many_min``, so ``final_test_many_acc`` is NaN)."""
    hints, n = [], 0
    for spec in TABLES.values():
        cols = [f"metrics.{m}" for _, m in spec]
        present = [c for c in cols if c in runs.columns]
        if not present or runs[present].notna().any(axis=1).sum() == 0:
            continue                          # no run reached this table at all
        finished = runs[runs[present].notna().any(axis=1)]
        n = max(n, len(finished))
        empty = [(label, m) for label, m in spec if f"metrics.{m}" not in finished.columns
                 or finished[f"metrics.{m}"].isna().all()]
        if empty:
            hints.append(", ".join(f"{m} ({label} classes)" for label, m in empty))
    if not hints:
        return ""
    return (f"; {n} run(s) finished, but every one lacks " + "; ".join(hints)
            + ": that class group is empty in the training set (check mining.few_max / mining.many_min against "
            "the classes' training counts)")


def build_tables(tracking_uri: str, experiment: str, parent_run_id: Optional[str] = None) -> dict[str, pd.DataFrame]:
    """``{"long_tail": df, "low_quality": df}`` for the tables that have finished runs (numeric cells)."""
    runs = fetch_runs(tracking_uri, experiment, parent_run_id)
    out = {}
    for table in TABLES:
        df = aggregate(runs, table)
        if not df.empty:
            out[table] = df
    return out


def format_table(df: pd.DataFrame, table: str, scale: float = 100.0) -> pd.DataFrame:
    """Display form: configuration columns, n, and ``mean ± std`` cells in percent (as in the paper).

    A configuration with one seed shows its value alone: one sample has no standard deviation (the numeric
    ``<col>_std`` stays 0 there so plots draw no error bar), and ``± 0.00`` would claim a spread of zero."""
    labels = [label for label, _ in TABLES[table]]
    config = [c for c in df.columns if c != "n" and not c.endswith(("_mean", "_std"))]
    shown = df[config + ["n"]].copy()

    def cell(m: float, s: float, n: int) -> str:
        return f"{m * scale:.2f}" if n < 2 else f"{m * scale:.2f} ± {s * scale:.2f}"

    for label in labels:
        shown[label] = [cell(m, s, n) for m, s, n in zip(df[f"{label}_mean"], df[f"{label}_std"], df["n"], strict=True)]
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def lam_histories(tracking_uri: str, runs: pd.DataFrame) -> pd.DataFrame:
    """Long table ``run_id, strategy, epoch, lam`` from each run's per-epoch ``lam`` metric."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    rows = []
    strat_col = "params.training.strategy"
    for _, run in runs.iterrows():
        hist = client.get_metric_history(run["run_id"], "lam")
        strategy = run.get(strat_col, "") if strat_col in runs.columns else ""
        for i, m in enumerate(sorted(hist, key=lambda m: (m.step, m.timestamp))):
            rows.append({"run_id": run["run_id"], "strategy": strategy, "epoch": m.step if m.step else i,
                         "lam": float(m.value)})
    return pd.DataFrame(rows, columns=["run_id", "strategy", "epoch", "lam"])


REAL_ONLY_Y = -0.22        # where real-only epochs (λ stored as the sentinel −1) are drawn
ALL_LEVELS_Y = -0.40       # where all-λ-mixed epochs (λ stored as NaN) are drawn
_MARKERS = "osD^vP*X"


def plot_lams(hist: pd.DataFrame, path: Path) -> Optional[Path]:
    """λ chosen per epoch by strategy: curriculum epochs on the λ axis (mean over the strategy's runs),
    real-only epochs (sentinel λ = −1) and all-λ epochs (NaN) as markers in their own labelled bands below
    it, so a ``none`` baseline (real data every epoch) is a visible row of markers, not an empty chart."""
    if hist.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    strategies = sorted(hist["strategy"].astype(str).unique())
    n = len(strategies)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    has_mixed = bool(hist["lam"].isna().any())
    bottom = (ALL_LEVELS_Y if has_mixed else REAL_ONLY_Y) - 0.1
    ax.axhspan(REAL_ONLY_Y - 0.08, REAL_ONLY_Y + 0.08, color="0.92", zorder=0)
    if has_mixed:
        ax.axhspan(ALL_LEVELS_Y - 0.08, ALL_LEVELS_Y + 0.08, color="#efe6f5", zorder=0)
    ax.axhline(-0.06, color="0.6", lw=0.8)
    for i, strategy in enumerate(strategies):
        grp = hist[hist["strategy"].astype(str) == strategy]
        color, marker = f"C{i % 10}", _MARKERS[i % len(_MARKERS)]
        dy = (i - (n - 1) / 2) * 0.12 / max(n - 1, 1)      # strategies one above the other inside a band
        cur = grp[grp["lam"] >= 0].groupby("epoch")["lam"].mean()
        if len(cur):
            ax.plot(cur.index, cur.values, marker=marker, ms=5, color=color, label=strategy)
        real = np.sort(grp.loc[grp["lam"] < 0, "epoch"].unique())
        if len(real):
            ax.scatter(real, np.full(len(real), REAL_ONLY_Y + dy), marker=marker, s=28, color=color,
                       label=None if len(cur) else strategy, zorder=3)
        mixed = np.sort(grp.loc[grp["lam"].isna(), "epoch"].unique())
        if len(mixed):
            ax.scatter(mixed, np.full(len(mixed), ALL_LEVELS_Y + dy), marker=marker, s=28, color=color,
                       label=None if len(cur) or len(real) else strategy, zorder=3)
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0, REAL_ONLY_Y] + ([ALL_LEVELS_Y] if has_mixed else [])
    labels = ["0", "0.25", "0.5", "0.75", "1 (real)", "real only"] + (["all λ mixed"] if has_mixed else [])
    ax.set_yticks(ticks, labels)
    ax.set_ylim(bottom, 1.06)
    ax.set_xlabel("epoch")
    ax.set_ylabel("λ (image guidance)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", color="0.9", lw=0.6)
    ax.legend(fontsize=8, title="strategy", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("λ per epoch (mean over seeds); markers below the axis: epochs without a λ", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_groups(df: pd.DataFrame, table: str, path: Path) -> Path:
    """Grouped bars: one group per configuration, one bar per column (many/medium/few/overall or OOD/ID)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _ in TABLES[table]]
    config = [c for c in df.columns if c != "n" and not c.endswith(("_mean", "_std"))]
    names = [", ".join(f"{v}" for v in row) or "all" for row in df[config].itertuples(index=False)]
    x = np.arange(len(df))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(df) + 2), 3.5))
    for i, label in enumerate(labels):
        ax.bar(x + i * width, df[f"{label}_mean"] * 100, width, yerr=df[f"{label}_std"] * 100, label=label)
    ax.set_xticks(x + width * (len(labels) - 1) / 2, names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)" if table == "long_tail" else "macro-F1 (%)")
    ax.legend(fontsize=7)
    ax.set_title("accuracy by class group" if table == "long_tail" else "ID / OOD macro-F1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(tracking_uri: str, experiment: str, out_dir: "str | Path | Storage",
                 parent_run_id: Optional[str] = None, log_to_mlflow: bool = True) -> dict[str, Any]:
    """Write ``<table>.md``, ``<table>.csv`` and plots under ``out_dir``; log them to a ``report`` run.

    ``out_dir`` is a local folder or an object-store location (``s3://…``, a :class:`Storage`): the files are
    drawn in a local temp folder and written there through ``discl_ray.runtime.storage``.
    The Markdown names the spectrum store(s) the trained runs read, with their digests (:func:`spectrum_stores`).
    Returns ``{"tables": {name: numeric df}, "files": [paths or URIs], "markdown": str, "run_id": id or None,
    "stores": [{"store", "digest", "runs"}]}``.
    """
    import tempfile

    from discl_ray.runtime.storage import as_storage

    dest = as_storage(out_dir)
    runs = fetch_runs(tracking_uri, experiment, parent_run_id)
    tables = {t: df for t in TABLES if not (df := aggregate(runs, t)).empty}
    if not tables:
        raise UserError(f"experiment {experiment!r} has no finished training runs (no final_test_* metrics)"
                        + _empty_group_hint(runs))
    with tempfile.TemporaryDirectory(prefix="discl-report-") as tmp:
        out = Path(dest.path) if dest.is_local else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        parts = [f"# {experiment}: results (mean ± std over seeds, %)\n"]
        trained = runs.dropna(subset=[f"metrics.{m}" for t in tables for _, m in TABLES[t]], how="all")
        stores = spectrum_stores(tracking_uri, trained)
        parts.append(store_lines(stores))
        for name, df in tables.items():
            shown = format_table(df, name)
            md = to_markdown(shown)
            parts.append(f"\n## {name.replace('_', '-')}\n\n{md}")
            (out / f"{name}.md").write_text(md)
            df.to_csv(out / f"{name}.csv", index=False)
            files += [out / f"{name}.md", out / f"{name}.csv", plot_groups(df, name, out / f"{name}_groups.png")]
        lam_plot = plot_lams(lam_histories(tracking_uri, trained), out / "lam_per_epoch.png")
        if lam_plot:
            files.append(lam_plot)
        markdown = "".join(parts)
        (out / "report.md").write_text(markdown)
        files.append(out / "report.md")
        run_id = _log_report(tracking_uri, experiment, files, parent_run_id) if log_to_mlflow else None
        if not dest.is_local:
            uploaded = []
            for f in files:
                target = dest.join(f.name)
                target.write_bytes(f.read_bytes())
                uploaded.append(target)
            files = uploaded
    return {"tables": tables, "files": files, "markdown": markdown, "run_id": run_id, "stores": stores}


def _log_report(tracking_uri: str, experiment: str, files: list[Path], parent_run_id: Optional[str]) -> str:
    import mlflow

    from discl_ray.runtime.tracking import git_commit

    use_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    tags = {"stage": "report", "git_commit": git_commit()}
    if parent_run_id:
        tags["report.parent_run_id"] = parent_run_id
    with mlflow.start_run(run_name="report", tags=tags) as run:
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="report")
        return run.info.run_id
