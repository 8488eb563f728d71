"""Loss curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(records: list[dict], path: str) -> None:
    """Train and validation loss against steps (bottom axis) and tokens seen (top axis), as the seed."""
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["train_loss"] for r in records], label="Training loss")
    ax.plot(steps, [r["val_loss"] for r in records], linestyle="-.", label="Validation loss")
    ax.set_xlabel("Step")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    top = ax.twiny()  # a second x axis in tokens seen, aligned with the steps
    top.plot([r["tokens_seen"] for r in records], [r["train_loss"] for r in records], alpha=0)
    top.set_xlabel("Tokens seen")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
