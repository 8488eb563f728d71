"""Loss curves as PNG files, drawn with matplotlib's object API (no pyplot, no display).

matplotlib is imported when the first figure is made, not with this module: importing it (with pyplot) is
slow, and every command-line start paid for it, a one-line config error included.
"""

from __future__ import annotations

from typing import Any


def figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A new (figure, axes) pair that belongs to no window: nothing to close, no global state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_losses(records: list[dict], path: str) -> None:
    """Train and validation loss against steps (bottom axis) and tokens seen (top axis), as the seed."""
    steps = [r["step"] for r in records]
    fig, ax = figure((6, 4))
    ax.plot(steps, [r["train_loss"] for r in records], label="Training loss")
    ax.plot(steps, [r["val_loss"] for r in records], linestyle="-.", label="Validation loss")
    ax.set_xlabel("Step")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    top = ax.twiny()  # a second x axis in tokens seen, aligned with the steps
    top.plot([r["tokens_seen"] for r in records], [r["train_loss"] for r in records], alpha=0)
    top.set_xlabel("Tokens seen")
    save(fig, path)
