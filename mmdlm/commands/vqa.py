"""Visual question answering from the command line: one question, or a JSONL file of them in batches.

    mmdlm vqa --model runs/quickstart/model --image scene.png --question "what color is the circle?"
    mmdlm vqa --model runs/quickstart/model --questions qa.jsonl --out answers.jsonl --batch-size 64
    mmdlm vqa --model runs/quickstart/model --device cpu --image scene.png --question "how many squares?" -v
    mmdlm-vqa --model DIR --image scene.png --question "is there a cross?" --threshold 0.9   # parallel decoding

Single mode prints the answer on stdout (with --verbose, the NFE and time on stderr). When the model
gives no answer (it puts end-of-text before any text token, as an untrained or confused model can),
stdout stays empty, stderr says "(no answer: the model produced only end-of-text)" and the exit status is 4.
Batch mode reads one JSON object a line, {"image": PATH, "question": STR} (a relative PATH is resolved
against the JSONL file's folder; other fields are kept), and writes the same object plus "answer" and
"nfe" (forward passes of its batch), one a line, in input order; a line the model gave no answer to gets
"answer": "" and "empty": true, and is counted in the summary on stderr. A bad line (malformed JSON, not
an object, a missing key, a missing or unreadable image, an empty or too-long question, a question that is
not valid UTF-8 text such as a lone surrogate "\\ud800" or a byte that is not UTF-8) is reported on stderr
as FILE:LINE: reason and skipped; every good line is still answered. Blank lines are ignored.
A --question that is not valid UTF-8 text is a usage error (exit 2).

Exit status:
    0  every question answered
    1  an unexpected failure (a bug: Python prints the traceback)
    2  usage error, nothing answered: bad arguments, model folder (missing, or damaged: its weights do not
       match the checksum recorded at export), --questions or --out file; in single mode also a
       missing/unreadable image or an empty/too-long/not-UTF-8 question
    3  batch mode: the good lines were answered, but some lines were skipped (see stderr)
    4  no answer: the model produced only end-of-text (single mode), or, in batch mode with no line
       skipped, for at least one line (marked "empty": true)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from PIL import Image

from mmdlm.inputs import (  # noqa: F401 (EXIT_OK, ...: this command's exit statuses, read as vqa.EXIT_*)
    EXIT_NO_ANSWER,
    EXIT_OK,
    EXIT_SKIPPED,
    EXIT_USAGE,
    InputError,
    add_model_arguments,
    add_revision_arguments,
    check_question,
    load_image,
    load_pipeline,
    positive_int,
    revision_options,
)
from mmdlm.sampling.arguments import add_sampler_arguments, defaults_help, sampler_from_args

if TYPE_CHECKING:  # torch and the pipeline load lazily so `--help` and argument errors answer at once
    from mmdlm.pipeline import MMDLMPipeline

NO_ANSWER = "(no answer: the model produced only end-of-text)"


def is_empty_answer(answer: str) -> bool:
    """True when the model gave no answer (end-of-text, or only specials, before any text token)."""
    return not answer.strip()


def json_line(record: dict) -> str:
    """One output line; fields echoed from the input that are not valid UTF-8 are written as JSON escapes."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


# ---- batch mode ----------------------------------------------------------------------------------------
@dataclass
class Query:
    line: int  # 1-based line number in the JSONL file (0 in single mode)
    record: dict  # the input fields, echoed in the output
    image: Image.Image
    question: str


Report = Callable[[int, str], None]  # (line number, reason): a skipped line


def parse_line(text: str, line: int, root: Path) -> Query:
    """One JSONL line -> a `Query` with its image loaded; `InputError` if the line is bad."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("image", "question") if key not in record]
    if missing:
        raise InputError(f"missing key {' and '.join(map(repr, missing))}")
    if not isinstance(record["image"], str) or not record["image"]:
        raise InputError("'image' must be a non-empty path string")
    question = check_question(record["question"])
    path = Path(record["image"]).expanduser()
    return Query(line, record, load_image(path if path.is_absolute() else root / path), question)


def read_queries(lines: Iterable[str], root: Path, report: Report) -> Iterator[Query]:
    """The good lines as `Query`s; the bad ones go to `report` and are skipped."""
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            yield parse_line(text.strip(), number, root)
        except InputError as err:
            report(number, str(err))


def batched(items: Iterable[Query], size: int) -> Iterator[list[Query]]:
    batch: list[Query] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def answer_batch(pipe: MMDLMPipeline, queries: list[Query], options: dict,
                 report: Report) -> list[tuple[Query, str, int]]:
    """Answer a batch in one call; if the pipeline rejects it (a too-long question), answer the queries
    one by one so that only the offending ones are reported and skipped."""
    try:
        out = pipe.answer([q.image for q in queries], [q.question for q in queries], **options)
        return [(q, text, out.nfe) for q, text in zip(queries, out.texts)]
    except ValueError as err:
        if len(queries) == 1:
            report(queries[0].line, str(err))
            return []
    return [result for q in queries for result in answer_batch(pipe, [q], options, report)]


def answer_file(pipe: MMDLMPipeline, path: Path, out: TextIO, batch_size: int, options: dict,
                verbose: bool = False) -> int:
    """Answer every good line of a JSONL file into `out`; returns the exit status (0, 3 or 4)."""
    skipped: list[int] = []
    empty = 0

    def report(line: int, reason: str) -> None:
        skipped.append(line)
        print(f"{path}:{line}: skipped: {reason}", file=sys.stderr)

    start, answered = time.perf_counter(), 0
    # surrogateescape: a byte that is not UTF-8 reaches check_text, which reports its line (it is not
    # silently replaced), and one in an image path still names the file on disk
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for batch in batched(read_queries(f, path.parent, report), batch_size):
            for query, answer, nfe in answer_batch(pipe, batch, options, report):
                record = {**query.record, "answer": answer, "nfe": nfe}
                if is_empty_answer(answer):
                    record["empty"] = True
                    empty += 1
                out.write(json_line(record))
                answered += 1
            out.flush()
    if verbose or skipped or empty:
        no_answer = f" ({empty} with no answer: the model produced only end-of-text)" if empty else ""
        print(f"answered {answered} question(s){no_answer}, skipped {len(skipped)} line(s) "
              f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_NO_ANSWER if empty else EXIT_OK


def answer_one(pipe: MMDLMPipeline, image: Image.Image, question: str, options: dict,
               verbose: bool = False) -> str:
    """Answer a single question (an `InputError` if the pipeline rejects it)."""
    start = time.perf_counter()
    try:
        out = pipe.answer([image], [question], **options)
    except ValueError as err:
        raise InputError(str(err)) from err
    if verbose:
        print(f"NFE {out.nfe}, {time.perf_counter() - start:.2f}s", file=sys.stderr)
    return out.texts[0]


# ---- command line ---------------------------------------------------------------------------------------
def build_parser(prog: str = "mmdlm vqa") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="the image to ask about (single mode; needs --question)")
    source.add_argument("--questions", type=Path, help="JSONL file of {'image', 'question'} lines (batch mode)")
    parser.add_argument("--question", help="the question (single mode)")
    parser.add_argument("--out", type=Path, help="batch mode: the output JSONL (default: stdout)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="questions per forward batch")
    add_sampler_arguments(parser, defaults_help("answer"), guidance=False)
    add_revision_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "mmdlm vqa") -> int:
    """Run the VQA command; returns (and, as a script, exits with) the status documented above."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.image is not None and args.question is None:
        parser.error("--image needs --question")
    if args.questions is not None and args.question is not None:
        parser.error("--question goes with --image; batch questions come from the --questions file")
    if args.image is None and not args.questions.is_file():
        parser.error(f"questions file '{args.questions}' does not exist")
    from mmdlm.pipeline import DEFAULT_SAMPLERS

    options = {"sampler": sampler_from_args(parser, args, DEFAULT_SAMPLERS["answer"]), "seed": args.seed}
    try:
        if args.image is not None:  # check the cheap inputs before loading the model
            image, question = load_image(args.image), check_question(args.question, "--question")
            pipe = load_pipeline(args.model, args.device)
            answer = answer_one(pipe, image, question, options | revision_options(args), args.verbose)
            if is_empty_answer(answer):
                print(NO_ANSWER, file=sys.stderr)
                return EXIT_NO_ANSWER
            print(answer)
            return EXIT_OK
        pipe = load_pipeline(args.model, args.device)
        options |= revision_options(args)
        if args.out is None:
            return answer_file(pipe, args.questions, sys.stdout, args.batch_size, options, args.verbose)
        with args.out.open("w", encoding="utf-8") as out:
            return answer_file(pipe, args.questions, out, args.batch_size, options, args.verbose)
    except (InputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
