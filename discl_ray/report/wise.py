"""The "+ WE" rows of the low-quality table (Tables 4-5): each configuration again, after WiSE-FT.

A run with ``training.wise_alphas`` reports, beside its own test macro-F1, the test macro-F1 of the WiSE-FT
model whose α won on ID validation (``final_wise_test_{id,ood}_f1``, see ``discl_ray.training.wise``). This
module turns those into rows of the same table: the configuration columns, a ``we`` column ("+ WE" there,
empty on the plain rows) and the mean ± std over seeds, as for any other row.
"""

from __future__ import annotations

import pandas as pd

# table name -> ordered (column label, MLflow metric) pairs.
TABLES: dict[str, list[tuple[str, str]]] = {
    "long_tail": [("many", "final_test_many_acc"), ("medium", "final_test_medium_acc"),
                  ("few", "final_test_few_acc"), ("overall", "final_test_acc")],
    "low_quality": [("ood_f1", "final_test_ood_f1"), ("id_f1", "final_test_id_f1")],
}


def _std(values: pd.Series) -> float:
    # Sample std over seeds; a single seed has no spread (0, not NaN, so tables stay readable).
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


WE_METRICS = {"final_test_ood_f1": "final_wise_test_ood_f1", "final_test_id_f1": "final_wise_test_id_f1"}
WE_LABEL = "+ WE"


def add_we_rows(runs: pd.DataFrame, table: str, plain: pd.DataFrame) -> pd.DataFrame:
    """``plain`` (``report.aggregate``'s rows) plus one "+ WE" row per configuration whose runs carry WiSE-FT
    test metrics, grouped by the same configuration columns as the plain rows."""
    if table != "low_quality" or plain.empty:
        return plain
    wise_cols = [f"metrics.{m}" for m in WE_METRICS.values()]
    if not all(c in runs.columns for c in wise_cols):
        return plain
    we = runs.dropna(subset=wise_cols)
    if we.empty:
        return plain
    keys = [c for c in plain.columns if c != "n" and not c.endswith(("_mean", "_std"))]
    grouped = we.fillna({f"params.{k}": "" for k in keys}).groupby([f"params.{k}" for k in keys], sort=True,
                                                                   dropna=False) if keys else [((), we)]
    rows = []
    for key, grp in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        row["n"] = len(grp)
        for label, metric in TABLES[table]:
            vals = grp[f"metrics.{WE_METRICS[metric]}"].astype(float)
            row[f"{label}_mean"] = float(vals.mean())
            row[f"{label}_std"] = _std(vals)
        rows.append(row)
    plain = plain.copy()
    plain.insert(len(keys), "we", "")
    extra = pd.DataFrame(rows)
    extra.insert(len(keys), "we", WE_LABEL)
    out = pd.concat([plain, extra], ignore_index=True)
    # Each configuration's "+ WE" row right below its plain row.
    return out.sort_values(keys + ["we"], kind="stable").reset_index(drop=True) if keys else out
