"""What an evaluation writes besides metrics.json's numbers: the Markdown report (`render_report`), the figure
of examples (`write_samples`), JSON-safe floats (`jsonable`), and the pieces the benchmark scripts' reports
share: one Markdown table (`md_table`) and the command line that made a result (`command_line`).
"""

from __future__ import annotations

import math
import shlex
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tasks (and torch) load when a report is rendered: the table helpers stay light
    from mmdlm.eval.tasks import Example

TITLES = {
    "vqa": "Visual question answering (exact match after strip/lower)",
    "caption": "Captioning",
    "t2i": "Text-to-image (prompt = canonical caption; image read by the scorer)",
    "joint": "Joint image + caption generation",
    "nll": "Held-out NLL per target token",
    "edit": "Image editing (the edited image read by the oracle against the edited scene)",
    "what_changed": "What changed? (two images, a question; exact match)",
}


def format_value(value: Any) -> str:
    """A metric value as report text: floats to 4 significant digits, dicts as `k: v` lists, text on one
    printable line with `|` and backticks made safe for a table cell or inline code."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) or "-"
    text = "".join(c if c.isprintable() else "?" for c in str(value).replace("\n", " "))
    return text.replace("|", "\\|").replace("`", "'")


def plain_cell(value: Any) -> str:
    """A benchmark table's cell: floats to 4 significant digits, anything else as text with `|` escaped."""
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
             cell: Callable[[Any], str] = plain_cell) -> list[str]:
    """A Markdown table's lines: the header, the rule, one line per row with each value written by `cell`."""
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _md_section(name: str, section: dict) -> list[str]:
    """A task's metrics as markdown: scalars in one table, each dict-of-dicts as its own table."""
    lines = [f"## {TITLES.get(name, name)}", ""]
    scalars = [(k, v) for k, v in section.items() if not isinstance(v, dict | list)]
    lines += md_table(["metric", "value"], scalars, format_value) + [""]
    for key, value in section.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(dict.fromkeys(c for v in value.values() for c in v))
            lines += [f"**{key}**", ""]
            lines += md_table([key, *columns], [[k, *(v.get(c, "") for c in columns)] for k, v in value.items()],
                              format_value)
            lines.append("")
        elif isinstance(value, dict):
            lines += [f"**{key}**: {format_value(value)}", ""]
        elif isinstance(value, list) and value:
            lines += [f"**{key}**", ""] + [f"- `{format_value(v)}`" for v in value] + [""]
    return lines


def render_report(metrics: dict) -> str:
    """metrics.json as a readable markdown report."""
    from mmdlm.eval.tasks import TASKS

    head = ["# mmdlm evaluation", ""]
    for key in ("model", "model_kind", "parameters", "source", "records", "device", "command"):
        if key in metrics:
            head.append(f"- **{key}**: `{format_value(metrics[key])}`")
    head += [f"- **settings**: {format_value(metrics.get('settings', {}))}", ""]
    body = [line for name in TASKS if name in metrics for line in _md_section(name, metrics[name])]
    return "\n".join(head + body) + "\n"


def _plain(text: str) -> str:
    """Printable ASCII for a figure title (generated text may hold any byte)."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text.encode("ascii", "replace").decode())


def write_samples(examples: dict[str, list[Example]], path: str | Path, columns: int | None = None) -> Path:
    """A figure with one row per task: its images with their prompts / captions / QA as titles (`columns`
    images a row; None: `N_EXAMPLES`, as many as a task keeps)."""
    import matplotlib

    from mmdlm.eval.tasks import N_EXAMPLES

    columns = N_EXAMPLES if columns is None else columns
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, ex[:columns]) for name, ex in examples.items() if ex]
    if not rows:
        raise ValueError("no examples to draw (run a generating task: vqa, caption, t2i or joint)")
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.3 * columns, 2.9 * len(rows)), squeeze=False)
    for (name, row), line in zip(rows, axes):
        for j, ax in enumerate(line):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            ax.imshow(row[j].image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
                      interpolation="nearest")
            wrapped = "\n".join(textwrap.fill(part, 30) for part in _plain(row[j].text).split("\n"))
            ax.set_title(wrapped, fontsize=6, parse_math=False)
        line[0].set_ylabel(name, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def jsonable(value: Any) -> Any:
    """Floats that JSON can hold (NaN / inf become None), recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """`python -m PROG ARGS...` as a shell line: how a result was made (`argv` None: this process's arguments)."""
    return shlex.join(["python", "-m", prog, *(sys.argv[1:] if argv is None else argv)])
