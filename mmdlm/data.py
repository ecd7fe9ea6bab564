"""Reading webdataset shards into Records (the Lightning DataModules built on them are in `mmdlm.training.data`).

A Record (docs/INTERFACES.md) is a dict: `__key__`, `image` FloatTensor[3,H,W] in [0,1] (resized and
centre-cropped to `image_size`), `codes` LongTensor[h,w] (pre-computed VQ codes from an `npy` member),
`captions` list[str], `qa` list[{question, answer, type}], `meta` (the json member).
Images are decoded by `vision.images.load_image`, the decoding the image tokenizers are fitted on.

Shards may be ours (`png` + `json`, from mmdlm/worlds/shapes.py or digits.py, + `npy` once pre-tokenized)
or in the img2dataset layout (`jpg`/`png` + `txt` caption + optional `json`), any image size or mode.

Data pipeline (webdataset's DataPipeline; the usual recipe for multi-worker / multi-GPU reading):

    shard list (or ResampledShards) -> [shard shuffle] -> split_by_node -> split_by_worker
      -> tar members grouped by key -> [sample shuffle buffer] -> decode -> transform -> [epoch length]

Bad input never kills a run: a corrupt or truncated tar member, an unreadable image, a non-UTF-8
text, text that is not valid Unicode (a lone surrogate from JSON's `"\ud800"`) or a sample without a
caption is skipped with a (rate-limited) warning and counted by reason in a `BadSampleCounter`,
webdataset `handler=` style. Programming errors are not swallowed: only `BadSample` exceptions are
handled; anything else propagates.

But data with nothing usable in it never spins for ever either: `max_bad_in_a_row` bad samples in a
row (default 1,000), or a full pass that yields no batch (`ShardLoader`), stop the run with
`NoUsableSamples`, a one-sentence `UserError` that `train.py` prints before exiting with status 2.
A shard pattern that matches nothing raises `ShardsNotFound` (also a `UserError`).

Under DDP, evaluation shards are split by sample, not by shard (`ShareSamples`): every rank gets
the same number of samples, so no rank waits for ever in a collective because another had fewer
(or no) val shards. `mmdlm.training.data.SkippedSamplesMonitor` logs the skip counts to the trainer's
logger (`data/skipped_<reason>`) and prints a summary at the end of fit.

    from mmdlm.data import record_pipeline
    record = next(iter(record_pipeline("data/shards/shapes/train/*.tar")))
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, get_worker_info

from mmdlm.errors import UserError
from vision.images import IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)

# why a sample was skipped ("text": text that is not valid Unicode: a txt member that is not UTF-8, or a
# caption / question / answer holding a lone surrogate, as JSON's "\ud800" gives, which no tokenizer encodes)
REASONS = ("open", "tar", "image", "text", "caption", "json", "codes", "transform")
MAX_BAD_IN_A_ROW = 1000  # consecutive bad samples (per reader process) that mean the data has nothing usable


class ShardsNotFound(UserError, FileNotFoundError):
    """A shard pattern (or part of one) that matches no file: one sentence naming the pattern."""


class NoUsableSamples(UserError):
    """Training or evaluation data in which nothing can be used: one sentence naming the shards."""

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:  # re-raised by a DataLoader from its worker: keep our sentence
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# shard lists


def _split_top_level(pattern: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside braces: 'a-{0,1}.tar,b.tar' -> ['a-{0,1}.tar', 'b.tar']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(pattern):
        depth += (char == "{") - (char == "}")
        if char == sep and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(url: str) -> list[str]:
    """One brace-expanded item: a remote url as is, a glob's matches, a folder's *.tar, or a file."""
    if "://" in url or url.startswith("pipe:"):
        return [url]
    path = os.path.expanduser(url)
    if glob.has_magic(path):
        return sorted(glob.glob(path))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    return [path] if os.path.exists(path) else []


def expand_shards(pattern: str | Iterable[str]) -> list[str]:
    """Shard paths from a glob (`data/x/*.tar`), a brace pattern (`shards-{000000..000009}.tar`), a
    folder (its *.tar), or a comma-separated list of these (a list of strings works too).

    Raises ShardsNotFound (a FileNotFoundError) naming the pattern when a part of it matches nothing,
    or names a file that does not exist (a missing shard in a brace range is a broken dataset, not a smaller one).
    """
    parts = _split_top_level(pattern) if isinstance(pattern, str) else [str(p) for p in pattern]
    if not parts:
        raise ShardsNotFound(f"empty shard pattern {pattern!r}")
    urls: list[str] = []
    for part in parts:
        found: list[str] = []
        for item in braceexpand(part):
            matches = _expand_one(item)
            if not matches:
                what = "matches no files" if item == part else f"names a missing shard {item!r}"
                raise ShardsNotFound(f"shard pattern {part!r} {what}")
            found += matches
        urls += found
    return list(dict.fromkeys(urls))  # de-duplicated, order kept


# ---------------------------------------------------------------------------------------------
# bad samples


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of REASONS. Raise it (e.g. from a DataModule's
    `transform`, with reason "transform") to skip a sample: the pipeline counts it and goes on."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class BadSampleCounter:
    """Counts skipped samples by reason (and good ones); a webdataset `handler=`.

    Counts are per process (per rank), summed over the DataLoader workers of that process: the table
    lives in shared memory with one row per worker, so a worker's counts are visible to the main
    process (where the LightningModule logs them) without messages or locks.

    Each row also counts its bad samples in a row (reset by a good one): at `max_bad_in_a_row` the
    handler raises `NoUsableSamples` instead of reading on, so data with nothing usable in it (a file
    that is not a tar, resampled for ever; shards without captions) stops the run in seconds.

    Args:
        max_workers: rows for DataLoader workers (more workers share rows; counts stay right but may race).
        log_first: warnings logged per reason per process before they are thinned to one in 1000.
        max_bad_in_a_row: bad samples in a row (per worker) that end the reading; None = never.
        source: what is read, for messages (e.g. "training shards 'data/train/*.tar'").
        parent: another counter that gets every count too (e.g. one for all of a DataModule's data).
    """

    def __init__(self, max_workers: int = 64, log_first: int = 10, max_bad_in_a_row: int | None = MAX_BAD_IN_A_ROW,
                 source: str = "the shards", parent: BadSampleCounter | None = None) -> None:
        if max_bad_in_a_row is not None and max_bad_in_a_row < 1:
            raise ValueError(f"max_bad_in_a_row must be >= 1 or None, got {max_bad_in_a_row}")
        # (rows, reasons + 2): row 0 = main process, row 1 + i = worker i; then good samples, bad in a row
        self._table = torch.zeros(max_workers + 1, len(REASONS) + 2, dtype=torch.int64).share_memory_()
        self.log_first = log_first
        self.max_bad_in_a_row = max_bad_in_a_row
        self.source = source
        self.parent = parent
        self._logged: dict[str, int] = {}

    _GOOD, _RUN = len(REASONS), len(REASONS) + 1  # columns

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (self._table.shape[0] - 1)

    def add(self, reason: str, n: int = 1) -> None:
        """Count `n` skipped samples of `reason`."""
        row = self._row()
        self._table[row, REASONS.index(reason)] += n
        self._table[row, self._RUN] += n
        if self.parent is not None:
            self.parent.add(reason, n)

    def add_good(self, n: int = 1) -> None:
        """Count `n` samples decoded fine (and end the current run of bad ones)."""
        row = self._row()
        self._table[row, self._GOOD] += n
        self._table[row, self._RUN] = 0
        if self.parent is not None:
            self.parent.add_good(n)

    def saw_usable(self) -> None:
        """A usable sample went by that this process does not keep (another rank's): ends the bad run."""
        self._table[self._row(), self._RUN] = 0

    def __call__(self, exn: Exception) -> bool:
        """The webdataset handler: count a `BadSample`, warn, continue; re-raise anything else.

        Raises NoUsableSamples once `max_bad_in_a_row` bad samples came in a row in this worker.
        """
        if not isinstance(exn, BadSample):
            raise exn
        self.add(exn.reason)
        seen = self._logged[exn.reason] = self._logged.get(exn.reason, 0) + 1
        if seen <= self.log_first or seen % 1000 == 0:
            log.warning("skipping a bad sample (%s; %d of this kind in this process)", exn, seen)
        run = int(self._table[self._row(), self._RUN])
        if self.max_bad_in_a_row is not None and run >= self.max_bad_in_a_row:
            raise NoUsableSamples(
                f"the last {run} samples read from {self.source} were all unusable ({self.describe()}; the last: "
                f"{str(exn):.160}), so reading stops; fix the data or raise --data.max_bad_in_a_row")
        return True

    @property
    def counts(self) -> dict[str, int]:
        """Skipped samples by reason (every reason present, zeros included)."""
        sums = self._table[:, : len(REASONS)].sum(0).tolist()
        return dict(zip(REASONS, sums))

    @property
    def total(self) -> int:
        """All skipped samples."""
        return int(self._table[:, : len(REASONS)].sum())

    @property
    def good(self) -> int:
        """Samples that came out of the pipeline (decoded and transformed fine)."""
        return int(self._table[:, self._GOOD].sum())

    def describe(self) -> str:
        """'3 skipped: caption 2, unicode 1' (or '0 skipped')."""
        bad = ", ".join(f"{reason} {n}" for reason, n in self.counts.items() if n)
        return f"{self.total} skipped" + (f": {bad}" if bad else "")

    def reset(self) -> None:
        """Zero every count (this counter's only, not its parent's)."""
        self._table.zero_()
        self._logged.clear()

    def __repr__(self) -> str:
        bad = {k: v for k, v in self.counts.items() if v}
        return f"BadSampleCounter(good={self.good}, bad={self.total} {bad})"


@dataclass
class CountGood:
    """Pipeline stage: count every sample that comes out of the pipeline as good (after the transform)."""

    counter: BadSampleCounter

    def __call__(self, src: Iterable) -> Iterator:
        for sample in src:
            self.counter.add_good()
            yield sample


# ---------------------------------------------------------------------------------------------
# tar -> samples


def _split_name(name: str) -> tuple[str | None, str]:
    """'dir/shapes-000001.png' -> ('dir/shapes-000001', 'png'); the key ends at the first dot of the
    basename (webdataset's convention: 'x.seg.png' has key 'x' and extension 'seg.png')."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key or key.startswith("__"):
        return None, ""
    return (f"{folder}/{key}" if folder else key), ext.lower()


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError)


@dataclass
class TarSamples:
    """Pipeline stage: shard urls -> samples {__key__, __url__, <ext>: bytes, ...}, one shard at a time.

    Damage is contained to the samples it touches:
    - a shard that cannot be opened, is not a tar or holds no member counts once as "open" (each time
      it is read: a resampled stream of such shards reaches the handler's `max_bad_in_a_row`);
    - a member whose data cannot be read (truncated shard, bad bytes) drops its sample, counted as
      "tar", and ends the shard (a tar stream cannot go past it);
    - garbage between members is skipped with a warning (tarfile `ignore_zeros` resyncs on the next
      valid header) and the rest of the shard is still read; the sample that lost a member to it is
      then judged by the decoder (no image / no caption);
    - a header that cannot be read, or a shard cut inside a header, ends the shard with a warning;
      the sample being read is passed on for the decoder to judge (it may be complete).
    """

    handler: Callable[[Exception], bool]

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            url = shard["url"]
            try:
                stream = wds.gopen(url, "rb")
                tar = tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True)
            except Exception as err:  # noqa: BLE001 (any opener failure: missing file, pipe, not a tar)
                self.handler(BadSample("open", f"cannot read shard {url}: {err!r}"))
                continue
            with stream, tar:
                yield from self._samples(tar, url)

    def _samples(self, tar: tarfile.TarFile, url: str) -> Iterator[dict]:
        current: dict | None = None
        dropped: str | None = None  # key of a sample dropped mid-way: its later members are ignored
        members, expected_offset = iter(tar), 0
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except _TAR_ERRORS as err:
                log.warning("shard %s ends early at an unreadable header (%r)", url, err)
                break
            if member.offset > expected_offset:
                log.warning("skipped %d corrupt bytes in %s before %s",
                            member.offset - expected_offset, url, member.name)
            blocks = math.ceil(member.size / tarfile.BLOCKSIZE)
            expected_offset = member.offset_data + blocks * tarfile.BLOCKSIZE
            key, ext = _split_name(member.name)
            if not member.isreg() or key is None or key == dropped:
                continue
            if current is not None and current["__key__"] != key:
                yield current  # complete: a member of the next sample begins
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            try:
                data = tar.extractfile(member).read()
            except _TAR_ERRORS as err:
                self.handler(BadSample("tar", f"{url}: sample {key} lost: {member.name} unreadable "
                                              f"({err!r}); the shard ends here"))
                return
            if ext in current:  # ambiguous: which one is the sample's? drop it
                self.handler(BadSample("tar", f"{url}: sample {key} has two {ext!r} members"))
                current, dropped = None, key
                continue
            current[ext] = data
        if expected_offset == 0:  # not one member: `ignore_zeros` read a non-tar file as an empty archive
            self.handler(BadSample("open", f"shard {url} holds no tar member (not a tar file, or an empty one)"))
            return
        if tar.offset < expected_offset + 2 * tarfile.BLOCKSIZE:  # no end-of-archive marker was read
            log.warning("shard %s ends without an end-of-archive marker: truncated? (samples after "
                        "%s may be lost uncounted)", url, current["__key__"] if current else "its start")
        if current is not None:
            yield current


# ---------------------------------------------------------------------------------------------
# decoding


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise BadSample("text", f"txt is not UTF-8 ({err})") from None


def _captions(meta: dict, txt: str | None) -> list[str]:
    """json `captions` (ours) or `caption` (img2dataset), then `txt` if it adds one; no empties."""
    found = meta.get("captions") or []
    if isinstance(found, str) or not all(isinstance(c, str) for c in found):
        raise BadSample("json", f"'captions' must be a list of strings, got {found!r:.80}")
    if isinstance(meta.get("caption"), str):
        found = [*found, meta["caption"]]
    if txt:
        found = [*found, txt]
    return list(dict.fromkeys(c.strip() for c in found if c.strip()))


def _qa(meta: dict) -> list[dict]:
    qa = meta.get("qa") or []
    ok = isinstance(qa, list) and all(
        isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)
        for q in qa)
    if not ok:
        raise BadSample("json", f"'qa' must be a list of {{question, answer}} strings, got {qa!r:.80}")
    return qa


def _check_unicode(key: str, record: dict) -> None:
    """Raise BadSample("text") if a caption, question or answer cannot be encoded (a lone surrogate)."""
    texts = [*record["captions"], *(t for qa in record["qa"] for t in (qa["question"], qa["answer"]))]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadSample("text", f"{key}: text {text!r:.60} is not valid Unicode ({err.reason} at "
                                       f"position {err.start})") from None


def _codes(data: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 (numpy raises many kinds on bad bytes)
        raise BadSample("codes", f"unreadable npy ({err!r})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise BadSample("codes", f"codes must be a 2-D integer array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))  # (h, w)


@dataclass
class RecordDecoder:
    """Pipeline map: raw tar sample -> Record (raises BadSample with the reason otherwise).

    Images are decoded when `load_images`, or when `load_codes` but the sample has no `npy`
    (so a consumer of codes still gets something to encode itself).
    """

    image_size: int = 32
    load_images: bool = True
    load_codes: bool = True
    require_captions: bool = True  # records promise >= 1 caption; image-only readers (VQ) need none

    def __call__(self, sample: dict) -> dict:
        record: dict[str, Any] = {"__key__": sample["__key__"], "__url__": sample.get("__url__")}
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise BadSample("json", f"{sample['__key__']}: unreadable json ({err})") from None
            if not isinstance(meta, dict):
                raise BadSample("json", f"{sample['__key__']}: json must be an object, "
                                        f"got {type(meta).__name__}")
        if "texts" in meta or "images" in meta:  # an interleaved document (MMC4 / OBELICS)
            record["segments"], record["targets"] = self._document(sample, meta)
            record.update(captions=[], qa=[], meta=meta)
            return record
        txt = _text(sample["txt"]) if "txt" in sample else None
        record["captions"] = _captions(meta, txt)
        if self.require_captions and not record["captions"]:
            raise BadSample("caption", f"{sample['__key__']}: no caption (no txt, no json captions)")
        record["qa"] = _qa(meta)
        _check_unicode(sample["__key__"], record)
        record["meta"] = meta
        if self.load_codes and "npy" in sample:
            record["codes"] = _codes(sample["npy"])
        if self.load_images or (self.load_codes and "codes" not in record):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                raise BadSample("image", f"{sample['__key__']}: no image member (has {sorted(sample)})")
            record["image"] = self._image(sample, ext)
        return record

    def _image(self, sample: dict, member: str) -> torch.Tensor:
        try:
            return load_image(sample[member], self.image_size)
        except Exception as err:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, ...)
            raise BadSample("image", f"{sample['__key__']}: unreadable {member} ({err!r})") from None

    def _document(self, sample: dict, meta: dict) -> tuple[list[dict], list[int | list[int]] | None]:
        """An interleaved document's segments ({"text": str} or {"image", "codes"}) and its `targets`.

        The json's `texts` and `images` are lists of one length, one entry per segment, exactly one of the two
        non-null (MMC4 / OBELICS); `images[i]` names the sample's member holding the image (e.g. "0.png", or
        "KEY.0.png"), and its codes, once pre-tokenized, are the member of the same stem with `npy` ("0.npy").
        `targets` (optional): the segments a recipe generates, each an index or a list of indices generated
        together (several answers of one document, none given to the others)."""
        key, texts, images = sample["__key__"], meta.get("texts"), meta.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images) or not texts:
            raise BadSample("json", f"{key}: a document needs 'texts' and 'images' lists of one length, "
                                    f"got {texts!r:.60} and {images!r:.60}")
        segments: list[dict] = []
        for i, (text, image) in enumerate(zip(texts, images)):
            if (text is None) == (image is None):
                raise BadSample("json", f"{key}: segment {i} must hold a text or an image (one of them null)")
            if text is not None:
                if not isinstance(text, str):
                    raise BadSample("json", f"{key}: texts[{i}] must be a string, got {text!r:.40}")
                segments.append({"text": text.strip()})
                continue
            member = str(image).removeprefix(key.rpartition("/")[2] + ".").lower()
            segment: dict[str, Any] = {}
            codes = member.rpartition(".")[0] + ".npy"
            if self.load_codes and codes in sample:
                segment["codes"] = _codes(sample[codes])
            if self.load_images or (self.load_codes and "codes" not in segment):
                if member not in sample:
                    raise BadSample("image", f"{key}: images[{i}] names {member!r}, which the sample lacks")
                segment["image"] = self._image(sample, member)
            segments.append(segment)
        _check_unicode(key, {"captions": [s["text"] for s in segments if "text" in s], "qa": []})
        targets = meta.get("targets")
        def index(t: Any) -> bool:
            return isinstance(t, int) and 0 <= t < len(segments)

        if targets is not None and (not isinstance(targets, list) or not targets or not all(
                index(t) or (isinstance(t, list) and t and all(map(index, t))) for t in targets)):
            raise BadSample("json", f"{key}: 'targets' must list segment indices in [0, {len(segments)}) (or lists "
                                    f"of them, generated together), got {targets!r:.60}")
        return segments, targets


@dataclass
class EpochLength:
    """Pipeline stage: end each pass after `n` samples per process, split over the DataLoader workers
    (webdataset's `with_epoch` counts per worker; this counts per process, i.e. per rank)."""

    n: int

    def __call__(self, src: Iterable) -> Iterator:
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        share = self.n // workers + (info is not None and info.id < self.n % workers)
        for i, sample in enumerate(src):
            if i >= share:
                return
            yield sample


@dataclass
class LengthBuckets:
    """Pipeline stage: batches of similar length, so that little of a batch is padding.

    Pools `pool` batches' worth of samples, sorts them by length, cuts the sorted pool into batches and
    yields those in a seeded random order (the pool-and-sort bucketing of fairseq / lhotse). Samples of a
    mixed-task stream differ in length (shapes: text-only 25 positions, captioning and text-to-image 87,
    VQA with 1-3 QA pairs 84-118), and a batch pads to its longest: with `pool=1` (plain batching) 26% of
    the computed positions are end padding. Yields lists of samples (one batch each): give the pipeline to
    a DataLoader with `batch_size=None`. A partial pool at the end of a pass is batched the same way.
    """

    batch_size: int
    pool: int
    seed: int = 0

    def __call__(self, src: Iterable) -> Iterator[list]:
        rng = random.Random(self.seed)
        buffer: list = []
        for sample in src:
            buffer.append(sample)
            if len(buffer) == self.batch_size * self.pool:
                yield from self._batches(buffer, rng)
                buffer = []
        if buffer:
            yield from self._batches(buffer, rng)

    def _batches(self, samples: list, rng: random.Random) -> Iterator[list]:
        ordered = sorted(samples, key=len)
        batches = [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        rng.shuffle(batches)
        yield from batches


@dataclass
class ShareSamples:
    """Pipeline stage that splits samples, not shards, between ranks and workers, in equal numbers.

    Every rank and worker reads all the shards and keeps every `slots`-th usable record (slot = rank x
    workers + worker), transformed; at the end of the pass it pads with a repeat of one of its records
    (as torch's `DistributedSampler` does) up to ceil(N / slots), N = all usable records. Every rank
    therefore yields the same number of samples, hence of batches, whatever the number of shards: the
    evaluation recipe under DDP, where a rank with fewer batches than another waits for ever in the
    next collective. Costs a full read of the shards per rank (fine for a validation set).
    """

    transform: Callable[[dict], Any] | None
    handler: BadSampleCounter

    def _apply(self, record: dict) -> Any:
        if self.transform is None:
            return record
        try:
            result = self.transform(dict(record))  # a copy: the record may be transformed again as padding
        except Exception as exn:  # noqa: BLE001 (the handler re-raises all but BadSample)
            self.handler(exn)
            return None
        if isinstance(result, dict):  # as wds.map does
            result["__key__"] = record.get("__key__")
        return result

    def __call__(self, records: Iterable[dict]) -> Iterator:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        slots, slot = world * workers, rank * workers + worker
        seen = kept = 0
        spares: list[dict] = []  # padding: this slot's first record that transformed fine, else the first one
        for i, record in enumerate(records):
            seen += 1
            if i % slots != slot:
                self.handler.saw_usable()
                if not spares:
                    spares.append(dict(record))
                continue
            sample = self._apply(record)
            if sample is None:
                continue
            if kept == 0:
                spares.insert(0, dict(record))
            kept += 1
            yield sample
        target = math.ceil(seen / slots)
        while kept < target and spares:
            sample = self._apply(spares[0])
            if sample is None:
                spares.pop(0)
                continue
            kept += 1
            yield sample


def distributed_world_size() -> int:
    """Processes in the default torch.distributed group (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def record_pipeline(
    urls: str | list[str],
    image_size: int = 32,
    shuffle: int = 0,
    resampled: bool = False,
    epoch_length: int | None = None,
    load_images: bool = True,
    load_codes: bool = True,
    seed: int = 0,
    *,
    require_captions: bool = True,
    transform: Callable[[dict], Any] | None = None,
    counter: BadSampleCounter | None = None,
    split: str = "shards",
) -> wds.DataPipeline:
    """A webdataset pipeline of Records (an IterableDataset; give it to a DataLoader).

    Args:
        urls: shard paths, or a pattern for `expand_shards`.
        image_size: side images are resized / centre-cropped to.
        shuffle: sample shuffle buffer (0 = read in shard order, deterministic); > 0 also shuffles
            the shard order (the same order on every rank, then split).
        resampled: draw shards with replacement forever (each worker and rank its own stream): the
            multi-GPU recipe, where ranks must see the same number of batches; pair with epoch_length.
        epoch_length: records per pass per process (rank), split over its workers; None = one pass.
        load_images: decode images into `image` (else only where `codes` are wanted but missing).
        load_codes: read `npy` members into `codes`.
        seed: seeds the shard order, the shuffle buffer and the resampling (deterministic runs).
        require_captions: skip (and count) samples without a caption.
        transform: applied to each Record last (raise BadSample to skip one; return None to drop).
        counter: where skipped samples are counted (a new one if None); also at `.bad_samples`.
        split: how ranks and DataLoader workers share the data: "shards" (each reads its own shards)
            or "samples" (each reads every shard and keeps its equal share of the samples, `ShareSamples`:
            evaluation under DDP with fewer shards than ranks); not with `resampled` or `shuffle`.
    """
    if split not in ("shards", "samples"):
        raise ValueError(f"split must be 'shards' or 'samples', got {split!r}")
    if split == "samples" and (resampled or shuffle > 0):
        raise ValueError("split='samples' reads the shards in order: it cannot be resampled or shuffled")
    urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
    counter = counter if counter is not None else BadSampleCounter()
    if resampled:
        stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle > 0:  # before the split, with one seed: every rank and worker agrees on the order
            stages.append(wds.detshuffle(len(urls), initial=len(urls), seed=seed))
        if split == "shards":
            stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(TarSamples(handler=counter))
    if shuffle > 0:
        stages.append(wds.detshuffle(shuffle, initial=min(shuffle, 100), seed=seed + 1))
    decoder = RecordDecoder(image_size, load_images, load_codes, require_captions)
    stages.append(wds.map(decoder, handler=counter))
    if split == "samples":
        stages.append(ShareSamples(transform, counter))
    elif transform is not None:
        stages.append(wds.map(transform, handler=counter))
    if epoch_length is not None:
        stages.append(EpochLength(epoch_length))
    stages.append(CountGood(counter))
    pipeline = wds.DataPipeline(*stages)
    pipeline.bad_samples = counter
    return pipeline


def collate_records(records: list[dict]) -> dict:
    """Default batch of Records: `image` (B,3,H,W) / `codes` (B,h,w) stacked when every record has
    them, everything else as lists."""
    batch: dict[str, Any] = {k: [r.get(k) for r in records] for k in ("__key__", "captions", "qa", "meta")}
    for name in ("image", "codes"):
        if records and all(name in r for r in records):
            batch[name] = torch.stack([r[name] for r in records])
    return batch


# ---------------------------------------------------------------------------------------------
# Lightning


class ShardLoader(DataLoader):
    """A DataLoader over a `record_pipeline` that refuses a pass with no batch at all.

    Lightning starts a new epoch after an empty one, for ever (and cannot be stopped by SIGTERM while
    it does): a training set whose every sample is bad, an empty shard, or a rank that got no shard
    would spin. Here such a pass raises `NoUsableSamples` naming the shards and the skip counts.
    """

    def __iter__(self):  # noqa: ANN204 (a generator of batches)
        counter: BadSampleCounter | None = getattr(self.dataset, "bad_samples", None)
        bad_before = counter.total if counter is not None else 0
        batches = 0
        for batch in super().__iter__():
            batches += 1
            yield batch
        if batches == 0 and counter is not None:
            skipped = counter.total - bad_before
            why = (f"every sample was skipped ({counter.describe()})" if skipped
                   else "the shards hold no sample for this process (empty shards, or fewer shards than "
                        "ranks x DataLoader workers without --data.resampled true)")
            raise NoUsableSamples(f"a full pass over {counter.source} gave no batch: {why}")
