"""PNG plots of a run (loss and dev-metric curves) and of a comparison (metric against trainable parameters)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: dict[str, list], path: str | Path, metric: str) -> None:
    """Left: training loss per step (and its running mean); right: the dev metric at each evaluation."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps, losses = history["step"], history["train_loss"]
    left.plot(steps, losses, alpha=0.35, label="train loss")
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    left.plot(steps, smooth, label=f"running mean ({window})")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    evals = [e.get(metric) for e in history["eval"]]
    right.plot(history["eval_step"], evals, marker="o")
    right.set_xlabel("step")
    right.set_ylabel(f"dev {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(rows: list[dict], path: str | Path, metric: str) -> list[tuple[str, int, float]]:
    """Dev metric after training (``row["after"]``) against trainable parameters (log scale), one labelled point
    per method; returns the points drawn as (method, trainable parameters, metric)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(r["method"], max(int(r["trainable_params"]), 1), float(r["after"])) for r in rows if r.get("after")]
    for method, x, y in points:
        ax.scatter(x, y)
        ax.annotate(method, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"dev {metric}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return points
