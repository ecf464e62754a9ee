"""WiSE-FT (Wortsman et al., 2022), the "+ WE" rows of Tables 4-5, with α chosen on validation.

Each α in ``training.wise_alphas`` mixes the zero-shot and the selected fine-tuned weights; the α with the best
``training.select_metric`` on the ID validation split wins and only that model is evaluated on the test
splits, so no test number ever informs a choice. Metric names:

* ``final_wise_val_<α>``      validation score of every α (the selection curve);
* ``wise_alpha``              the chosen α;
* ``final_wise_<test key>``   the chosen model's test metrics, under the plain run's names with ``wise_``
  (``final_wise_test_id_f1``, ``final_wise_test_ood_f1``; long-tail: ``final_wise_test_acc``, …).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from discl_ray.training.losses import wise_interpolate
from discl_ray.training.schedules import lam_key


def wise_on_validation(evaluate: Callable, tc, zero_shot: dict, net, best_model: dict,
                       has_ood: bool) -> dict[str, Any]:
    """Pick α on ``val`` and report the test metrics of that α only.

    ``evaluate(split, model) -> (metrics, confusion)`` is the Train loop's evaluator; ``net`` a model of the
    run's architecture (its weights are replaced); ``best_model`` the state selected on validation."""
    out: dict[str, Any] = {}
    scores, nets = {}, {}
    for alpha in tc.wise_alphas:
        wnet = copy.deepcopy(net)
        wnet.load_state_dict(wise_interpolate(zero_shot, best_model, alpha))
        scores[alpha] = evaluate("val", wnet)[0][tc.select_metric]
        nets[alpha] = wnet
        out[f"final_wise_val_{lam_key(alpha)}"] = scores[alpha]
    if not scores:
        return out
    # Ties go to the larger α (closer to the fine-tuned model the run selected).
    alpha = max(sorted(scores, reverse=True), key=lambda a: scores[a])
    out["wise_alpha"] = float(alpha)
    out[f"wise_best_{tc.select_metric}"] = scores[alpha]
    chosen = nets[alpha]
    if tc.task == "long_tail":
        out.update({f"final_wise_{k}": v for k, v in evaluate("test", chosen)[0].items()})
        return out
    out["final_wise_test_id_f1"] = evaluate("test", chosen)[0]["test_f1"]
    if has_ood:
        out["final_wise_test_ood_f1"] = evaluate("test_ood", chosen)[0]["test_ood_f1"]
    return out
