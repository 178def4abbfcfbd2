"""`udg gates CHECKPOINT`: what a +UDG model's gates learned, in numbers.

Per gated layer, over the events of one split:
  - width, mean gate, spread, and the share of gates saturated (> 0.95 or < 0.05);
  - between-user share: the part of the gates' variance explained by who the user is (the rest varies with
    the candidate and the history); near 1, a layer's gates act as a per-user scale; near 0, as a per-event
    feature selection;
and for the whole model, the AUC when the gates are replaced by
  - each user's mean gate (the gates keep the user, lose the event), and
  - the mean gate over all events (no personalisation at all),
which says how much the model relies on what its gates carry. On the synthetic data, whose generator
records each user's planted decisiveness (the per-user logit scale, a column of its user table), it also
reports how well a user's mean gate vector predicts that decisiveness (ridge regression, cross-validated
R²) next to the base model's user vector and the UDG embedding.
"""

from __future__ import annotations

import argparse

import numpy as np

SATURATED = 0.95


def ridge_r2(features: np.ndarray, target: np.ndarray, alpha_per_row: float = 0.01, folds: int = 5) -> float:
    """Cross-validated R² of a ridge regression (standardised features, penalty alpha_per_row × rows; users
    split into `folds`)."""
    order = np.random.default_rng(0).permutation(len(target))
    predicted = np.zeros_like(target, dtype=np.float64)
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        mean, std = features[train].mean(0), features[train].std(0) + 1e-9
        x = (features[train] - mean) / std
        penalty = alpha_per_row * len(train) * np.eye(x.shape[1])
        weights = np.linalg.solve(x.T @ x + penalty, x.T @ (target[train] - target[train].mean()))
        predicted[test] = ((features[test] - mean) / std) @ weights + target[train].mean()
    return float(1.0 - np.mean((predicted - target) ** 2) / np.var(target))


def per_user_mean(values: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """[n_users, width] mean of `values` over each user's events; `inverse` maps events to user rows."""
    sums = np.zeros((inverse.max() + 1, values.shape[1]))
    np.add.at(sums, inverse, values)
    return sums / np.bincount(inverse)[:, None]


def gate_report(model, samples, planted: np.ndarray | None = None) -> dict:
    """{"layers": [...], "auc": {...}, "planted": {...} or None} for a +UDG model on `samples`; `planted` is a
    per-user-number value to predict from the gates (the synthetic world's log decisiveness)."""
    import torch

    from model.metrics import all_metrics
    from model.train import to_tensors

    if not hasattr(model, "gates"):
        raise ValueError("this model has no UDG gates (train it with --udg)")
    model.eval()
    batch = to_tensors(samples)
    # Sorted distinct users, each one's first event, and every event's user row: computed once, used by all.
    distinct, first, inverse = np.unique(samples.user, return_index=True, return_inverse=True)
    with torch.no_grad():
        user_vec, udg_vec = model.user_state(batch["user"], batch["profile"])
        gates = model.gate_values(user_vec, udg_vec, batch["history"], batch["item"])
        h0 = model.base.mlp_input(user_vec, batch["history"], batch["item"])
        side = model.base.side_logit(user_vec, batch["history"], batch["item"])

        def auc_with(layer_gates) -> float:
            logit = model.base.mlp(h0, [torch.as_tensor(g, dtype=torch.float32) for g in layer_gates])
            logit = logit if side is None else logit + side
            return all_metrics(samples.label, torch.sigmoid(logit).numpy())["auc"]

        values = [g.expand(len(samples), -1).numpy() for g in gates]
        user_means, layers = [], []
        for index, g in enumerate(values):
            means = per_user_mean(g, inverse)
            total = float(g.var(0).sum())
            between = float(((means[inverse] - g.mean(0)) ** 2).mean(0).sum())
            layers.append({"layer": index, "width": g.shape[1], "mean": float(g.mean()), "std": float(g.std()),
                           "saturated_high": float((g > SATURATED).mean()),
                           "saturated_low": float((g < 1 - SATURATED).mean()),
                           "between_user_share": between / total if total > 0 else 0.0})
            user_means.append(means)
        auc = {"trained gates": auc_with(values),
               "each user's mean gate": auc_with([means[inverse] for means in user_means]),
               "mean gate over all events": auc_with([np.repeat(g.mean(0, keepdims=True), len(g), 0) for g in values])}
    report = {"layers": layers, "auc": auc, "planted": None}
    if planted is not None:
        truth = np.asarray(planted, np.float64)[samples.user_key[first]]
        with torch.no_grad():
            base_vec, udg = model.user_state(torch.as_tensor(distinct), batch["profile"][first])
        report["planted"] = {"users": len(distinct),
                             **{f"layer {i} mean gate": ridge_r2(m, truth) for i, m in enumerate(user_means)},
                             "base user vector": ridge_r2(base_vec.numpy(), truth),
                             "UDG embedding": ridge_r2(udg.numpy(), truth)}
    return report


def format_report(report: dict) -> str:
    lines = ["| gated layer | width | mean | std | > 0.95 | < 0.05 | between-user share of variance |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for layer in report["layers"]:
        lines.append(f"| {layer['layer']} | {layer['width']} | {layer['mean']:.3f} | {layer['std']:.3f} | "
                     f"{layer['saturated_high']:.1%} | {layer['saturated_low']:.1%} | "
                     f"{layer['between_user_share']:.2f} |")
    lines += ["", "| gates | AUC |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in report["auc"].items()]
    if report["planted"]:
        planted = dict(report["planted"])
        lines += ["", f"Planted log decisiveness of {planted.pop('users')} users, predicted from (ridge, 5-fold R²):",
                  "| from | R² |", "|---|---:|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in planted.items()]
    return "\n".join(lines)


def cmd_gates(args: argparse.Namespace) -> int:
    import torch

    from model.commands import load_checkpoint_and_data

    torch.set_num_threads(args.threads)
    _, model, data = load_checkpoint_and_data(args.checkpoint)
    samples = data.splits[args.split]
    if len(samples) == 0:
        raise SystemExit(f"the {args.split} split is empty")
    try:
        report = gate_report(model, samples, data.user_columns.get("log_decisiveness"))
    except ValueError as error:
        raise SystemExit(f"{args.checkpoint}: {error}") from None
    print(format_report(report))
    return 0
