"""Learning curves: the headline numbers a curve follows in an `mmdlm evaluate` metrics dict (`headline`), the
project's targets on them, and the plot of runs against training steps or wall-clock minutes (`plot`), shared
by `benchmarks.learning_curve` (a run's checkpoints) and `benchmarks.budget_plot` (finished runs).
"""

from __future__ import annotations

from pathlib import Path

# the plot's panels: (title, keys of `headline` drawn in it)
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("VQA accuracy", ("vqa", "vqa_position")),
    ("caption attribute F1", ("caption_min_f1", "caption_color_f1", "caption_cell_f1")),
    ("text-to-image (oracle)", ("t2i_all_correct", "t2i_color")),
    ("held-out NLL per target token", ("nll",)),
    ("image editing (oracle)", ("edit_all_correct", "edit_rest_unchanged")),
    ("what changed? accuracy", ("what_changed",)),
)
# the GPU and editing recipes' targets: (what, key of `headline`, the least value that meets it); a target whose task
# was not evaluated is not reported
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("VQA accuracy >= 97%", "vqa", 0.97),
    ("every caption attribute F1 >= 0.95", "caption_min_f1", 0.95),
    ("text-to-image all-correct >= 90%", "t2i_all_correct", 0.90),
    ("edit all-correct >= 50%", "edit_all_correct", 0.50),
    ("what changed accuracy >= 70%", "what_changed", 0.70),
)
X_LABELS = {"step": "training steps", "minutes": "wall-clock minutes since the run started"}


def headline(metrics: dict) -> dict[str, float]:
    """The numbers a learning curve follows, from an `mmdlm evaluate` metrics dict (absent tasks skipped)."""
    out: dict[str, float] = {}
    if "vqa" in metrics:
        out["vqa"] = metrics["vqa"]["accuracy"]
        out |= {f"vqa_{k}": v["accuracy"] for k, v in metrics["vqa"]["per_type"].items()}
    if "caption" in metrics:
        c = metrics["caption"]
        out["caption_exact_match"] = c["exact_match"]
        f1 = {k: v["f1"] for k, v in c.get("per_attribute", {}).items()}
        out |= {f"caption_{k}_f1": v for k, v in f1.items()}
        if f1:
            out["caption_min_f1"] = min(f1.values())  # the worst attribute: the target holds for all or none
    if "t2i" in metrics:
        t = metrics["t2i"]
        out |= {f"t2i_{k}": t[k] for k in ("all_correct", "count_correct", "cell", "color", "shape", "size",
                                           "extra_objects") if k in t}
    if "nll" in metrics:
        out["nll"] = metrics["nll"]["nll"]
    if metrics.get("edit", {}).get("n"):
        e = metrics["edit"]
        out |= {f"edit_{k}": e[k] for k in ("all_correct", "edited_ok", "rest_unchanged")}
        out |= {f"edit_{k}": v["all_correct"] for k, v in e["per_kind"].items()}
    if metrics.get("what_changed", {}).get("n"):
        out["what_changed"] = metrics["what_changed"]["accuracy"]
    return out


def plot(curves: dict[str, list[dict]], path: Path, x: str = "step") -> Path:
    """One panel per `PANELS` entry: its keys against training steps (`x="step"`) or wall-clock minutes
    (`x="minutes"`), one colour per run; the `TARGETS` as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {key for points in curves.values() for p in points for key in p["headline"]}
    panels = [panel for panel in PANELS if found & set(panel[1])] or list(PANELS)  # the tasks evaluated
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    styles = ("o-", "s--", "^:")
    for ax, (title, keys) in zip(axes[0], panels):
        for i, (name, points) in enumerate(curves.items()):
            color = f"C{i % 10}"  # matplotlib's default cycle: every run drawn, however many
            for style, key in zip(styles, keys):
                pts = [(p[x], p["headline"][key]) for p in points if key in p["headline"] and p.get(x) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, color=color, label=f"{name}: {key}", markersize=4)
        for _, key, least in TARGETS:
            if key in keys:
                ax.axhline(least, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel(X_LABELS[x])
        if x == "minutes":
            ax.set_xlim(left=0)
        if "nll" not in keys:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, framealpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
