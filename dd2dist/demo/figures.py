"""The demo's figures: sample grids side by side per sampler, and the training loss curves from MLflow."""

from __future__ import annotations

from pathlib import Path

from dd2dist.demo.report import TITLES

GRID_METHODS = ("teacher", "one_step", "dd1", "refined_2", "marginals")


def save_sample_figure(results: dict, path: Path, title: str, columns: int = 6) -> Path:
    """One PNG: the first ``columns`` samples of every class (rows) for each sampler, read back from the
    per-sampler grids ``evaluate_run`` writes (10 columns = classes 0..9, one sample per class per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    names = [n for n in GRID_METHODS if n in results and results[n].get("grid")]
    fig, axes = plt.subplots(1, len(names), figsize=(1.75 * len(names), 3.1), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = mpimg.imread(results[name]["grid"])  # tile rows: sample index; tile columns: class
        cell = (grid.shape[1] - 1) // 10  # save_image pads 1 pixel around each tile
        rows = min(columns, (grid.shape[0] - 1) // cell)
        tiles = grid[1 : 1 + rows * cell, 1 : 1 + 10 * cell].reshape(rows, cell, 10, cell, grid.shape[2])
        by_class = tiles.transpose(2, 1, 0, 3, 4).reshape(10 * cell, rows * cell, grid.shape[2])  # tiles moved only
        ax.imshow(by_class, interpolation="nearest")
        ax.set_title(TITLES.get(name, name), fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


LOSS_KEYS = ("student_head/loss", "student/loss", "generator/regression_loss", "guidance/loss", "generator/loss")


def loss_histories(run_id: str, tracking_uri: str) -> dict[str, list[tuple[int, float]]]:
    """The training losses of an MLflow run: {key: [(iteration, value)]}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for key in LOSS_KEYS:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if hist:
            out[key] = hist
    return out


def save_loss_curves(histories: dict[str, dict], path: Path) -> Path:
    """One PNG, one panel per family: the stage-1 GTS loss, the generator's PF-ODE regression loss (when the recipe
    has that phase), the guidance FCS loss and the generator CSD loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.2), squeeze=False)
    for ax, (family, hist) in zip(axes[0], histories.items()):
        for key, values in hist.items():
            steps, vals = zip(*values)
            ax.plot(steps, vals, label=key, lw=1, color=f"C{LOSS_KEYS.index(key)}")  # one colour per loss
        ax.set_title(f"{family}: training losses (MLflow)", fontsize=9)
        ax.set_xlabel("iteration (optimizer steps of all roles)")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
