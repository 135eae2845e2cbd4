"""Training metrics on disk: a JSONL log written as it goes, a CSV and PNG plots against
cumulative rollouts generated (the x-axis ReMix's sample-efficiency claim is about)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["MetricsLog", "plot_runs"]


class MetricsLog:
    """Appends one JSON object per record to `<dir>/metrics.jsonl`; `write_csv` flattens them."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        if self.directory is None:
            return
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def write_csv(self, history: list[dict]) -> Path | None:
        if self.directory is None or not history:
            return None
        keys: list[str] = []
        for rec in history:
            keys += [k for k in rec if k not in keys and not isinstance(rec[k], dict)]
        path = self.directory / "metrics.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        return path


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def plot_runs(runs: dict[str, list[dict]], path: str | Path, title: str = "",
              target: float | None = None) -> Path:
    """Held-out success, training reward and response length against cumulative rollouts, one
    line per run (several seeds of one method may share a label prefix and colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {}
    for name, history in runs.items():
        method = name.split("/")[0]
        colour = colours.setdefault(method, f"C{len(colours)}")
        label = method if sum(n.split("/")[0] == method for n in list(runs)[: list(runs).index(name) + 1]) == 1 else None
        ev = [r for r in history if not _missing(r.get("eval_success"))]
        axes[0].plot([r["rollouts"] for r in ev], [r["eval_success"] for r in ev], color=colour,
                     label=label, alpha=0.8)
        tr = [r for r in history if not _missing(r.get("reward_mean"))]
        axes[1].plot([r["rollouts"] for r in tr], [r["reward_mean"] for r in tr], color=colour,
                     label=label, alpha=0.6)
        axes[2].plot([r["rollouts"] for r in tr], [r["response_len"] for r in tr], color=colour,
                     label=label, alpha=0.6)
    if target is not None:
        axes[0].axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    for ax, ylabel in zip(axes, ["held-out success", "training reward (fresh rollouts)",
                                 "response length (tokens)"]):
        ax.set_xlabel("cumulative rollouts generated")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
