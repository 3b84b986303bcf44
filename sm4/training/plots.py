"""PNG plots of training runs (matplotlib): per-task validation curves of one or more runs, the
per-modality k that AEA chose, and ALP's per-modality weights, epoch by epoch."""

from .._io import write_atomically


def plot_runs(histories: dict[str, list[dict]], metrics: dict[str, str], path: str) -> None:
    """histories: {run label: Trainer.history}; metrics: {task: metric name}. Writes ``path`` atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("plots need matplotlib (pip install matplotlib)") from error
    tasks = list(metrics)
    panels = len(tasks) + 2
    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for axis, task in zip(flat, tasks):
        for label, history in histories.items():
            epochs = [entry["epoch"] for entry in history]
            axis.plot(epochs, [entry["val"][task][metrics[task]] for entry in history], marker=".", label=label)
        axis.set_title(f"{task}: validation {metrics[task]}", fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.legend(fontsize=7)
    for axis, key, title in ((flat[len(tasks)], "k", "AEA: k per modality"), (flat[len(tasks) + 1], "alp_weights", "ALP: weight per modality")):
        for label, history in histories.items():
            if not history or not history[0].get(key):
                continue
            for modality in history[0][key]:
                axis.plot([e["epoch"] for e in history], [e[key][modality] for e in history], marker=".",
                          label=f"{label}: {modality}")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.legend(fontsize=6)
    for axis in flat[panels:]:
        axis.axis("off")
    figure.tight_layout()
    try:
        write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100), suffix=".png")
    finally:
        plt.close(figure)
