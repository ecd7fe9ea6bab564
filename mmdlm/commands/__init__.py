"""The `mmdlm` command: one entry point whose subcommands are mmdlm's user-facing commands.

    mmdlm --help                                       # the subcommands, one line each
    mmdlm train fit --config configs/mdm-shapes.yaml   # = python train.py fit --config ...
    mmdlm vqa --model runs/quickstart/model --image scene.png --question "what color is the circle?"
    mmdlm generate --model runs/quickstart/model --prompt "a large red circle at the top left" --out samples.png
    mmdlm SUBCOMMAND --help                            # that subcommand's own options

Each subcommand hands the rest of the command line, unchanged, to its module in `mmdlm.commands` (`mmdlm vqa ...`
is `mmdlm vqa ...`; `mmdlm train ...` is `python train.py ...`), so the options, checks, error
sentences and exit statuses are that module's; `python -m mmdlm ...` is this command. Paths (`configs/...`,
`train.py` in the quickstart) are relative to the current directory.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
import textwrap
import warnings
from collections.abc import Sequence

PROG = "mmdlm"

# subcommand -> the module whose `main(argv, prog=...)` runs it, in the order of a user's day
SUBCOMMANDS: dict[str, str] = {
    "quickstart": "mmdlm.commands.quickstart",
    "train": "mmdlm.commands.train",
    "pretokenize": "mmdlm.commands.pretokenize",
    "export": "mmdlm.commands.export",
    "evaluate": "mmdlm.commands.evaluate",
    "vqa": "mmdlm.commands.vqa",
    "caption": "mmdlm.commands.caption",
    "generate": "mmdlm.commands.generate",
    "infill": "mmdlm.commands.infill",
    "demo": "mmdlm.commands.demo",
}

EXIT_USAGE = 2


def summary(module: str) -> str:
    """The first sentence of `module`'s docstring, read from its source without importing it (importing the
    demo alone loads torch and Gradio; `mmdlm --help` should take a moment, not seconds)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraph = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    first, dot, _ = paragraph.partition(". ")
    return first + dot.strip() if dot else paragraph


def help_text() -> str:
    """`mmdlm --help`: usage, then each subcommand with its module's one-line summary."""
    width = max(map(len, SUBCOMMANDS)) + 4
    lines = [f"usage: {PROG} SUBCOMMAND [ARGS...]", "",
             "Multimodal masked-diffusion language models: one transformer over text and VQ image tokens.", "",
             "subcommands:"]
    for name, module in SUBCOMMANDS.items():
        lines.append(textwrap.fill(summary(module), width=110, initial_indent=f"  {name:<{width}}",
                                   subsequent_indent=" " * (width + 2)))
    lines += ["", f"'{PROG} SUBCOMMAND --help' shows a subcommand's options.",
              "'python -m mmdlm.commands.SUBCOMMAND ...' and 'python train.py ...' are the same commands."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mmdlm SUBCOMMAND ARGS...`: returns the subcommand's exit status (0 when it returns nothing); help
    with no subcommand (exit 2) or with -h/--help (exit 0); one sentence and exit 2 for an unknown one."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(help_text())
        return EXIT_USAGE
    name, rest = args[0], args[1:]
    if name in ("-h", "--help") or (name == "help" and not rest):
        sys.stdout.write(help_text())
        return 0
    if name == "help":  # `mmdlm help vqa` = `mmdlm vqa --help`
        name, rest = rest[0], ["--help"]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = (f" (did you mean '{close[0]}'?)" if close
                else " (options go after the subcommand)" if name.startswith("-") else "")
        print(f"{PROG}: error: {name!r} is not a subcommand{hint}; the subcommands are {', '.join(SUBCOMMANDS)} "
              f"('{PROG} --help' describes them)", file=sys.stderr)
        return EXIT_USAGE
    if name == "train":  # LightningCLI warns when it gets `args` while sys.argv has some: here it always does
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    module = importlib.import_module(SUBCOMMANDS[name])
    status = module.main(rest, prog=f"{PROG} {name}")
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main())
