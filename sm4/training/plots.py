"""PNG plots of training runs (matplotlib): per-task validation curves of one or more runs, the
per-modality k that AEA chose, and ALP's per-modality weights, epoch by epoch."""

from .._io import pyplot, save_figure

AXIS_LABELS = {"k": "experts per token k", "alp_weights": "ALP weight"}


def plot_runs(histories: dict[str, list[dict]], metrics: dict[str, str], path: str) -> None:
    """histories: {run label: Trainer.history}; metrics: {task: metric name}. Writes ``path`` atomically."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

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
        axis.set_ylabel(f"validation {metrics[task]}", fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis, key, title in ((flat[len(tasks)], "k", "AEA: k per modality"), (flat[len(tasks) + 1], "alp_weights", "ALP: weight per modality")):
        for label, history in histories.items():
            if not history or not history[0].get(key):
                continue
            for modality in history[0][key]:
                axis.plot([e["epoch"] for e in history], [e[key][modality] for e in history], marker=".",
                          label=f"{label}: {modality}")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.set_ylabel(AXIS_LABELS[key], fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "k":
            axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        if axis.lines:  # beside the panel, where it hides no line
            axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    for axis in flat[panels:]:
        axis.axis("off")
    # one legend of the runs for the task panels, below the figure
    handles, labels = flat[0].get_legend_handles_labels() if tasks else ([], [])
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    save_figure(figure, path)


def plot_expert_usage(usage: dict, modality_names: list[str], task_names: list[str], path: str) -> None:
    """Heat maps of sm4.experiment.expert_usage: per router, the share of each modality's (top row)
    and each task's (bottom row) assignments that go to each expert. Writes ``path`` atomically."""
    plt = pyplot()

    routers = list(usage)
    figure, axes = plt.subplots(2, len(routers), figsize=(3.2 * len(routers) + 1.0, 5.0), squeeze=False)
    shares = {(router, kind): usage[router][kind] / usage[router][kind].sum(dim=1, keepdim=True).clamp_min(1)
              for router in routers for kind in ("modality", "task")}
    top = max([float(share.max()) for share in shares.values()] + [1e-9])  # one colour scale for every panel
    image = None
    for column, router in enumerate(routers):
        for row, (kind, names) in enumerate((("modality", modality_names), ("task", task_names))):
            share = shares[(router, kind)]
            axis = axes[row][column]
            image = axis.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
            axis.set_yticks(range(len(names)), names, fontsize=6)
            axis.set_title(f"{router}: per {kind}", fontsize=8)
            axis.set_xlabel("expert", fontsize=7)
            axis.tick_params(axis="x", labelsize=6)
    figure.tight_layout()
    if image is not None:
        bar = figure.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        bar.set_label("share of the row's assignments", fontsize=7)
    save_figure(figure, path)
