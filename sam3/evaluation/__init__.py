"""Evaluation: model-free scoring of COCO results against a COCO or SA-Co GT file (box/mask AP, cgF1, IL_MCC, pmF1).

`score` gives the metrics dict written to metrics.json; `pr_curve` and `per_category_rows` give plot data.
"""

from sam3.evaluation.scoring import per_category_rows, pr_curve, score

__all__ = ["per_category_rows", "pr_curve", "score"]
