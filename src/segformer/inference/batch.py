"""Prediction at scale: the inputs of a run, its output names, a manifest that makes it
resumable, sharding across torchrun ranks, and the merged summary. ``segformer predict`` is a
thin layer over ``run_batch``.

**Inputs** (``InputPlan``) come from files, folders (walked with ``os.scandir``, one sorted
directory listing at a time, symlinks followed, loops reported), glob patterns and list files
(one path per line), as a generator: a single folder of any size is enumerated in constant
memory. Several sources, globs or lists need a duplicate and name-clash check that costs about
100 bytes per file. Every rank enumerates the same stream; input ``i`` belongs to rank
``i % world_size``, so shares are balanced and reproducible.

**Outputs** of an input with output name ``S``: ``S.png`` (label map), ``S_overlay.png``,
``S.json`` (as ``--save`` asks); videos ``S_overlay.<ext>`` and ``S_frames.csv``. A file found
in folder ``F`` keeps its path below ``F``. An output never replaces an input: when the output
folder holds inputs (``cd photos; segformer predict photo.png --out .``) every input is listed
before anything is written, and a name whose outputs would land on an input gets ``_seg``
(``photo_seg.png``). Each file is written to a temporary name and renamed.

**The manifest** (``OUT/.segformer/manifest-rank<R>.jsonl``, append-only, one JSON line per
event): before an input's outputs are written a ``writing`` line claims them, after they are
all in place a ``done`` (or ``error``) line records their sizes and the summary record. Lines
are written unbuffered, so ``kill -9`` loses at most the inputs in flight, and fsync'd about
once a second (a power cut may lose a second more). A later run with the same settings skips
inputs whose ``done`` line names outputs that are all present with their recorded sizes, and
redoes everything else; claimed outputs of earlier runs are never taken as inputs.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import glob
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from segformer.errors import InputError, SegformerError
from segformer.inference.segmenter import SegmentationResult, atomic_path, write_atomic
from segformer.inference.video import VIDEO_EXTENSIONS, is_video, output_suffix, segment_video

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jfif",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
OUTPUT_KINDS = ("labels", "overlay", "json")
DEFAULT_SAVE = OUTPUT_KINDS  # what `segformer predict` has always written
STATE_DIR = ".segformer"  # the manifest and progress files, inside the output folder
RESERVED_STEMS = ("summary", STATE_DIR)
COLLISION_SUFFIX = "_seg"
# atomic_path's temporary names: ".<stem>.<8 hex>.tmp<suffix>"
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[A-Za-z0-9]+)?$")


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    """One file to segment: where it is, its output name (may contain folders, ``a/b/x``),
    whether it is a video, and its position in the run's enumeration."""

    path: Path
    stem: str
    video: bool
    index: int

    @property
    def key(self) -> str:
        """What the manifest knows this input by: its name as given and its output name."""
        return f"{self.path}\0{self.stem}"


@dataclass(frozen=True)
class Problem:
    """An input argument or list line that gave nothing to segment (``level="error"``), or a
    file skipped with a warning (a symlink loop)."""

    text: str
    reason: str
    index: int = 0
    level: str = "error"

    def line(self) -> str:
        return f"{self.level}: {self.text}: {self.reason}"


def output_names(stem: str, video: Path | None, save: Sequence[str]) -> dict[str, str]:
    """The files an input with output name ``stem`` gets, by kind (paths relative to the
    output folder). ``video``: the source, for videos (its container picks the suffix)."""
    if video is not None:
        return {
            "overlay": f"{stem}_overlay{output_suffix(video)}",
            "frames_csv": f"{stem}_frames.csv",
        }
    names = {"labels": f"{stem}.png", "overlay": f"{stem}_overlay.png", "json": f"{stem}.json"}
    return {kind: name for kind, name in names.items() if kind in save}


def _wanted(name: str) -> bool:

    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class _Raw:
    path: Path
    stem: str  # preferred output name, before clash handling
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) when known


@dataclass
class InputPlan:
    """The inputs of a run (see the module docstring). Iterating yields ``Input`` and
    ``Problem`` in a fixed order, the same on every rank and every time; ``materialised``
    says whether the list was built up front (the output folder holds inputs)."""

    sources: list[str]
    lists: list[str]
    out_dir: Path
    save: tuple[str, ...] = DEFAULT_SAVE
    claimed: frozenset[str] = frozenset()  # outputs of earlier runs (relative to out_dir)
    materialised: bool = False
    protected: frozenset[str] = frozenset()  # real paths of inputs inside out_dir
    skipped_outputs: dict[str, int] = field(
        default_factory=dict
    )  # source → earlier outputs skipped
    _raw: list[_Raw | Problem] | None = None

    @classmethod
    def create(
        cls,
        sources: Sequence[str],
        out_dir: str | os.PathLike,
        *,
        lists: Sequence[str] = (),
        save: Sequence[str] = DEFAULT_SAVE,
        claimed: Iterable[str] = (),
    ) -> InputPlan:
        out_dir = Path(out_dir).expanduser()
        for name in lists:
            if not os.path.isfile(name):
                raise InputError(f"{name}: no such list file")
        plan = cls(list(sources), list(lists), out_dir, tuple(save), frozenset(claimed))
        if plan._may_hold_inputs():
            # Outputs will land among inputs: list everything before anything is written, so
            # no output is taken for an input and no input is overwritten.
            plan._raw = list(plan._raw_inputs())
            out_real = os.path.realpath(out_dir)
            plan.protected = frozenset(
                real
                for item in plan._raw
                if isinstance(item, _Raw) and _inside(real := os.path.realpath(item.path), out_real)
            )
            plan.materialised = True
        return plan

    def _may_hold_inputs(self) -> bool:
        """Whether the output folder overlaps an input folder or holds an input file (cheap
        tests: no folder is walked)."""
        out_real = os.path.realpath(self.out_dir)
        for text in self.sources:
            real = os.path.realpath(os.path.expanduser(text))
            if os.path.isdir(real):
                if _inside(out_real, real) or _inside(real, out_real):
                    return True
            elif os.path.exists(real):
                if _inside(real, out_real):
                    return True
            else:
                for match in glob.iglob(os.path.expanduser(text), recursive=True):
                    real = os.path.realpath(match)
                    if _inside(real, out_real) or (os.path.isdir(real) and _inside(out_real, real)):
                        return True
        for name in self.lists:
            for _, line in _list_lines(name):
                if _inside(os.path.realpath(line), out_real):
                    return True
        return False

    # -- enumeration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Input | Problem]:
        raw: Iterable[_Raw | Problem] = self._raw if self._raw is not None else self._raw_inputs()
        # One folder yields unique names and files by construction; anything more needs sets.
        track = len(self.sources) + len(self.lists) != 1 or not os.path.isdir(
            os.path.expanduser(self.sources[0]) if self.sources else ""
        )
        taken: dict[int, str] = {}  # name digest → the extension of the file that took it
        seen: set[tuple[int, int]] = set()
        index = 0
        for item in raw:
            if isinstance(item, Problem):
                yield Problem(item.text, item.reason, index, item.level)
                index += 1
                continue
            if track:
                identity = item.identity or _identity(item.path)
                if identity is not None:
                    if identity in seen:
                        continue  # the same file named twice
                    seen.add(identity)
            video = _is_video(item.path)
            stem = self._free_stem(item, video, taken if track else None)
            if stem is None:
                reason = (
                    f"every output name for it would overwrite an input in {self.out_dir}; "
                    "choose another --out"
                )
                yield Problem(str(item.path), reason, index)
            else:
                yield Input(item.path, stem, video, index)
            index += 1

    def count(self) -> int:
        """How many entries iterating yields, roughly (no duplicate check): for an ETA."""
        if self._raw is not None:
            return len(self._raw)
        return sum(1 for _ in self._raw_inputs(quiet=True))

    def _free_stem(self, item: _Raw, video: bool, taken: dict[int, str] | None) -> str | None:
        """The output name of ``item``: its preferred name unless another input took it
        (``x.png`` beside ``x.jpg`` → ``x_jpg``; same name and extension → ``x-2``) or its
        outputs would land on an input (→ ``x_seg``); None when no name is free."""
        stem = item.stem
        suffix = item.path.suffix.lower()
        if taken is not None:
            candidates = [stem]
            if suffix and taken.get(_digest(stem), suffix) != suffix:
                candidates.append(f"{stem}_{suffix.lstrip('.')}")
            candidates += (f"{stem}-{n}" for n in range(2, 10_000))
            stem = next(c for c in candidates if _digest(c) not in taken)
        if self.protected:
            base = stem
            for n in range(1, 100):
                names = output_names(stem, item.path if video else None, self.save)
                real = (os.path.realpath(self.out_dir / name) for name in names.values())
                if not any(r in self.protected for r in real) and (
                    taken is None or _digest(stem) not in taken
                ):
                    break
                stem = f"{base}{COLLISION_SUFFIX}" + (f"-{n}" if n > 1 else "")
            else:
                return None
        if taken is not None:
            taken[_digest(stem)] = sys.intern(suffix)
        return stem

    def _raw_inputs(self, quiet: bool = False) -> Iterator[_Raw | Problem]:
        out_real = os.path.realpath(self.out_dir)
        for text in self.sources:
            path = Path(text).expanduser()
            if path.is_dir():
                yield from self._folder(text, path, out_real, quiet)
            elif path.is_file():
                yield _Raw(path, path.stem)
            elif os.path.islink(path):
                yield Problem(text, _broken_link_reason(path))
            else:
                matches = sorted(glob.glob(str(path), recursive=True))
                found = False
                for match in matches:
                    if os.path.isdir(match):
                        for item in self._folder(match, Path(match), out_real, quiet):
                            found = found or isinstance(item, _Raw)
                            yield item
                    elif os.path.isfile(match) and not self._is_claimed(match, out_real):
                        found = True
                        yield _Raw(Path(match), Path(match).stem)
                if not found:
                    yield Problem(
                        text,
                        "no files match this pattern"
                        if glob.has_magic(text)
                        else "no such file or folder",
                    )
        for name in self.lists:
            for number, line in _list_lines(name):
                path = Path(line)
                if path.is_file():
                    yield _Raw(path, _list_stem(path))
                else:
                    what = "not a file" if path.exists() else "no such file"
                    yield Problem(f"{name}:{number}: {line}", what)

    def _is_claimed(self, path: str, out_real: str) -> bool:
        if not self.claimed:
            return False
        real = os.path.realpath(path)
        return _inside(real, out_real) and os.path.relpath(real, out_real) in self.claimed

    def _folder(
        self, text: str, root: Path, out_real: str, quiet: bool
    ) -> Iterator[_Raw | Problem]:
        """Files below ``root`` with image or video extensions, depth first in sorted order,
        one directory listing in memory at a time. Symlinks are followed; one that leads back
        into a folder above it, or into itself, is reported and skipped."""
        state_dir = os.path.join(out_real, STATE_DIR)
        found = skipped = 0
        # stack of (folder path, relative posix prefix, identities of the folders above)
        root_stat = root.stat()
        stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
            (str(root), "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))
        ]
        while stack:
            folder, prefix, above = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError as exc:
                if not quiet:
                    yield Problem(
                        folder, f"cannot read this folder ({exc.strerror or exc})", 0, "warning"
                    )
                continue
            subfolders = []
            files = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                    is_file = not is_dir and entry.is_file()
                    info = entry.stat() if (is_dir or entry.is_symlink()) else None
                except OSError as exc:
                    if entry.is_symlink() and not quiet:
                        yield Problem(
                            entry.path, _broken_link_reason(Path(entry.path), exc), 0, "warning"
                        )
                    continue
                if is_dir:
                    assert info is not None
                    identity = (info.st_dev, info.st_ino)
                    if identity in above:
                        if not quiet:
                            yield Problem(
                                entry.path,
                                "symlink loop (leads back to a folder above it), skipped",
                                0,
                                "warning",
                            )
                        continue
                    if os.path.realpath(entry.path) == state_dir:
                        continue
                    subfolders.append((entry.path, f"{prefix}{entry.name}/", above | {identity}))
                elif is_file and _wanted(entry.name):
                    if self.claimed and self._is_claimed(entry.path, out_real):
                        skipped += 1  # an output of an earlier run into this folder
                        continue
                    identity = (info.st_dev, info.st_ino) if info else None
                    files.append((entry, identity))
            for stem, (entry, identity) in zip(
                _unique_stems([e.name for e, _ in files], prefix), files, strict=True
            ):
                found += 1
                yield _Raw(Path(entry.path), stem, identity)
            stack.extend(reversed(subfolders))
        if skipped:
            self.skipped_outputs[text] = skipped
        if not found and not quiet:
            reason = "folder holds no image or video files"
            if skipped:
                reason += f" other than {skipped} output(s) of an earlier run into {self.out_dir}, which are not segmented again"
            yield Problem(text, reason)


def _unique_stems(names: list[str], prefix: str) -> list[str]:
    """Output names for the files of one folder: ``x.png`` → ``<prefix>x``; when two files
    share a stem (``x.png``, ``x.jpg``) the later ones get their extension (``x_jpg``)."""
    stems = [os.path.splitext(n)[0] for n in names]
    used = {s.lower() for s in stems}
    if not prefix:
        used |= set(RESERVED_STEMS)
    result, taken = [], set()
    for name, stem in zip(names, stems, strict=True):
        unique = stem
        if unique.lower() in taken or (not prefix and unique.lower() in RESERVED_STEMS):
            unique = f"{stem}_{os.path.splitext(name)[1].lower().lstrip('.')}"
            number = 2
            while unique.lower() in used:
                unique = f"{stem}-{number}"
                number += 1
            used.add(unique.lower())
        taken.add(unique.lower())
        result.append(prefix + unique)
    return result


def _list_lines(name: str) -> Iterator[tuple[int, str]]:
    """(line number, path) for each non-empty, non-comment line of a list file."""
    try:
        with open(name, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                line = line.rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    yield number, os.path.expanduser(line)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot read this list file ({exc})") from None


def _list_stem(path: Path) -> str:
    """A listed file's output name: its path without the extension, anchors and ``..``
    dropped (``photos/a/x.jpg`` → ``photos/a/x``, ``/data/x.jpg`` → ``data/x``)."""
    parts = [p for p in path.with_suffix("").parts if p not in (path.anchor, "..", ".")]
    return "/".join(parts) or path.stem


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _digest(stem: str) -> int:
    # 8 bytes per name instead of the string: the clash check of a million files stays small.
    return int.from_bytes(hashlib.blake2b(stem.lower().encode(), digest_size=8).digest(), "big")


def _is_video(path: Path) -> bool:

    return is_video(path)


def _broken_link_reason(path: Path, exc: OSError | None = None) -> str:
    try:
        path.stat()
    except OSError as error:
        exc = error
    if exc is not None and exc.errno == 40:  # ELOOP
        return "symlink loop (the link leads back to itself), skipped"
    return "broken symlink (its target does not exist), skipped"


def shard(index: int, rank: int, world_size: int) -> bool:
    """Whether input number ``index`` of the run belongs to ``rank``."""
    return index % world_size == rank


# ---------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------
def settings_key(settings: dict[str, Any]) -> str:
    """A short fingerprint of what decides the outputs (model, mode, precision, outputs …):
    a run with other settings does not count earlier outputs as done."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Entry:
    status: str
    outputs: dict[str, list[Any]]  # kind → [relative path, size]
    file: int
    offset: int


class Manifest:
    """What earlier runs into an output folder did, read from every rank's manifest file."""

    def __init__(self, out_dir: Path, settings: str) -> None:
        self.out_dir = out_dir
        self.settings = settings
        self.files: list[Path] = sorted((out_dir / STATE_DIR).glob("manifest-rank*.jsonl"))
        self.entries: dict[str, _Entry] = {}  # input key → its latest line
        self.claimed: set[str] = set()
        self.other_settings = 0
        for number, path in enumerate(self.files):
            with open(path, "rb") as file:
                offset = 0
                for raw in file:
                    line_offset, offset = offset, offset + len(raw)
                    try:
                        data = json.loads(raw)
                    except ValueError:
                        continue  # a line cut short by a power cut
                    outputs = data.get("outputs") or {}
                    self.claimed.update(name for name, _ in outputs.values())
                    if data.get("settings") != settings:
                        self.other_settings += data.get("status") == "done"
                        continue
                    self.entries[data["key"]] = _Entry(data["status"], outputs, number, line_offset)

    def done(self, item: Input) -> bool:
        """Whether an earlier run finished ``item`` and all its outputs are still there, whole."""
        entry = self.entries.get(item.key)
        if entry is None or entry.status != "done":
            return False
        for name, size in entry.outputs.values():
            try:
                if os.stat(self.out_dir / name).st_size != size:
                    return False
            except OSError:
                return False
        return True

    def record(self, item: Input) -> dict[str, Any] | None:
        """The summary record of ``item``'s latest ``done`` or ``error`` line."""
        entry = self.entries.get(item.key)
        if entry is None or entry.status == "writing":
            return None
        with open(self.files[entry.file], "rb") as file:
            file.seek(entry.offset)
            return json.loads(file.readline())["record"]


class ManifestWriter:
    """Appends this rank's lines (see the module docstring)."""

    FSYNC_SECONDS = 1.0

    def __init__(self, out_dir: Path, rank: int, settings: str) -> None:
        folder = out_dir / STATE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"manifest-rank{rank}.jsonl"
        self.settings = settings
        # O_APPEND + one os.write per line: a killed process leaves whole lines behind.
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        self.synced = time.monotonic()

    def write(
        self,
        item: Input,
        status: str,
        outputs: dict[str, list[Any]],
        record: dict[str, Any] | None = None,
    ) -> None:
        line = {"key": item.key, "status": status, "settings": self.settings, "outputs": outputs}
        if record is not None:
            line["record"] = record
        os.write(self.fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())
        if time.monotonic() - self.synced > self.FSYNC_SECONDS:
            os.fsync(self.fd)
            self.synced = time.monotonic()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def remove_leftover_temporaries(out_dir: Path, protected: frozenset[str]) -> int:
    """Delete temporary files an interrupted run left in ``out_dir`` (``atomic_path``'s
    ``.<name>.<8 hex>.tmp<ext>``); returns how many. Call before any rank writes."""
    removed = 0
    state = os.path.realpath(out_dir / STATE_DIR)
    for folder, dirs, files in os.walk(out_dir):
        if os.path.realpath(folder) == state:
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(folder, name)
            if _TEMP_NAME.match(name) and os.path.realpath(path) not in protected:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
    return removed


# ---------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place in a torchrun job (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``),
    or rank 0 of 1 without torchrun. Uses a gloo process group for the start barrier."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    token: str = ""

    @classmethod
    def from_environment(cls, timeout_s: float = 7200.0) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ranks = cls(
            int(os.environ.get("RANK", "0")),
            world,
            int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        )
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        ranks.token = ranks.broadcast(secrets.token_hex(4))
        return ranks

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def default_threads(local_world_size: int) -> int:
    """CPU threads for one rank: the cores this process may use, shared among the ranks of
    this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


# ---------------------------------------------------------------------------------------
# Progress across ranks
# ---------------------------------------------------------------------------------------
@dataclass
class Counts:
    segmented: int = 0  # images and videos segmented by this run
    skipped: int = 0  # finished by an earlier run
    failed: int = 0
    finished: bool = False

    @property
    def handled(self) -> int:
        return self.segmented + self.skipped + self.failed

    def add(self, other: Counts) -> None:
        self.segmented += other.segmented
        self.skipped += other.skipped
        self.failed += other.failed


class Progress:
    """Each rank rewrites ``progress-<run>-rank<R>.json`` at most twice a second; rank 0 adds
    them up for one bar (images/s and ETA over all ranks) and waits for every rank's final
    file before writing the summary."""

    def __init__(
        self, out_dir: Path, ranks: Ranks, show: bool, total: Callable[[], int] | None
    ) -> None:
        self.folder = out_dir / STATE_DIR
        self.ranks = ranks
        self.mine = Counts()
        self.written = 0.0
        self.bar = None
        if ranks.rank == 0 and show:
            self.bar = tqdm(unit="img", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
            if total is not None:
                # Counting a large folder takes a while: the bar starts at once, the ETA later.
                def count() -> None:
                    with contextlib.suppress(Exception):
                        self.bar.total = total()  # type: ignore[union-attr]

                threading.Thread(target=count, daemon=True, name="segformer-count").start()

    def _path(self, rank: int) -> Path:
        return self.folder / f"progress-{self.ranks.token}-rank{rank}.json"

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.written < 0.5:
            return
        self.written = now
        if self.ranks.world_size > 1:
            write_atomic(self._path(self.ranks.rank), json.dumps(self.mine.__dict__).encode())
        if self.bar is not None:
            total = self.all()
            self.bar.n = total.handled
            self.bar.refresh()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def all(self) -> Counts:
        total = Counts(**{**self.mine.__dict__, "finished": True})
        for rank in range(1, self.ranks.world_size) if self.ranks.rank == 0 else ():
            try:
                theirs = Counts(**json.loads(self._path(rank).read_bytes()))
            except (OSError, ValueError):
                theirs = Counts()
            total.add(theirs)
            total.finished = total.finished and theirs.finished
        return total

    def finish(self, poll_s: float = 0.2) -> Counts:
        """Mark this rank finished; on rank 0, wait until every rank is and return the sums."""
        self.mine.finished = True
        self.update(force=True)
        if self.ranks.rank != 0:
            return self.mine
        while not (total := self.all()).finished:
            time.sleep(poll_s)
            self.update(force=True)
        if self.bar is not None:
            self.bar.close()
        for rank in range(1, self.ranks.world_size):
            self._path(rank).unlink(missing_ok=True)
        return total


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
@dataclass
class BatchOptions:
    save: tuple[str, ...] = DEFAULT_SAVE
    opacity: float = 0.5
    legend: bool = True
    max_frames: int | None = None
    codec: str | None = None
    show_progress: bool = True


@dataclass
class BatchReport:
    """What ``run_batch`` did, over all ranks (on rank 0; other ranks: their own share)."""

    counts: Counts
    inputs: int = 0
    seconds: float = 0.0
    summary: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)
    removed_temporaries: int = 0

    @property
    def images_per_second(self) -> float | None:
        return (
            self.counts.segmented / self.seconds if self.seconds and self.counts.segmented else None
        )


def run_settings(segmenter: Any, options: BatchOptions) -> dict[str, Any]:
    return {
        "model": segmenter.name,
        "mode": segmenter.mode.to_dict(),
        "backend": getattr(segmenter.engine, "backend", None),
        "precision": getattr(segmenter.engine, "precision", None),
        "save": sorted(options.save),
        "opacity": options.opacity,
        "legend": options.legend,
        "max_frames": options.max_frames,
        "codec": options.codec,
    }


def run_batch(
    segmenter: Any,
    sources: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    lists: Sequence[str] = (),
    options: BatchOptions | None = None,
    ranks: Ranks | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchReport:
    """Segment every input of ``sources`` and ``lists`` (this rank's share) into ``out_dir``,
    skipping what an earlier run with the same settings finished; rank 0 then writes
    ``summary.json`` and ``summary.csv`` for all inputs. ``log`` receives the lines for a
    person (problems, resume notes). Raises ``InputError`` when there is nothing to do."""
    options = options or BatchOptions()
    ranks = ranks or Ranks()
    out_dir = Path(out_dir).expanduser()
    say = log or (lambda line: print(line, file=sys.stderr))
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    key = settings_key(run_settings(segmenter, options))
    manifest = Manifest(out_dir, key)
    plan = InputPlan.create(
        sources, out_dir, lists=lists, save=options.save, claimed=manifest.claimed
    )
    removed = _prepare_output(out_dir, plan, manifest, ranks, say)
    ranks.barrier()  # nothing is written before the cleanup and (materialised) listing are done

    writer = ManifestWriter(out_dir, ranks.rank, key)
    progress = Progress(
        out_dir, ranks, options.show_progress, None if plan.materialised else plan.count
    )
    if plan.materialised and progress.bar is not None:
        progress.bar.total = plan.count()
    started = time.perf_counter()
    failures: list[str] = []
    try:
        mine = _my_inputs(plan, manifest, ranks, progress, say)
        _segment_inputs(segmenter, mine, out_dir, options, writer, progress, failures)
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    counts = progress.finish()
    report = BatchReport(counts, seconds=seconds, failures=failures, removed_temporaries=removed)
    if ranks.rank == 0:
        summary = write_summary(out_dir, plan, Manifest(out_dir, key), segmenter, report, ranks)
        report.summary = summary
        report.inputs = summary["inputs"]
        report.counts.failed = summary["failed"]
    return report


def _prepare_output(
    out_dir: Path,
    plan: InputPlan,
    manifest: Manifest,
    ranks: Ranks,
    say: Callable[[str], None],
) -> int:
    """Get ``out_dir`` ready: rank 0 says whether this run resumes an earlier one and removes
    the temporaries an interrupted run left; the folder is created; and the run stops here
    (``InputError``) when there is nothing to segment. Returns the temporaries removed."""
    removed = 0
    if ranks.rank == 0:
        if manifest.entries:
            done = sum(1 for e in manifest.entries.values() if e.status == "done")
            say(
                f"resuming: {out_dir} records {done} finished input(s); those whose outputs are intact are skipped"
            )
        elif manifest.other_settings:
            say(
                f"note: the earlier run into {out_dir} used other settings (model, mode or outputs); segmenting everything again"
            )
        if manifest.files:
            removed = remove_leftover_temporaries(out_dir, plan.protected)
            if removed:
                say(f"removed {removed} half-written temporary file(s) left by an interrupted run")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"{out_dir}: cannot create the output folder ({exc.strerror or exc})"
        ) from None
    if not any(isinstance(item, Input) for item in plan):
        for item in plan if ranks.rank == 0 else ():
            say(item.line())  # type: ignore[union-attr]
        raise InputError("nothing to segment: no readable inputs given")
    return removed


def _my_inputs(
    plan: InputPlan,
    manifest: Manifest,
    ranks: Ranks,
    progress: Progress,
    say: Callable[[str], None],
) -> Iterator[Input]:
    """The inputs this rank segments now: in its share and not finished intact by an earlier
    run (those count as skipped). Problems are reported by rank 0 only, so each appears once."""
    for item in plan:
        if isinstance(item, Problem):
            if ranks.rank == 0:
                say(item.line())
            continue
        if not shard(item.index, ranks.rank, ranks.world_size):
            continue
        if manifest.done(item):
            progress.mine.skipped += 1
            progress.update()
            continue
        yield item


def _segment_inputs(
    segmenter: Any,
    inputs: Iterable[Input],
    out_dir: Path,
    options: BatchOptions,
    writer: ManifestWriter,
    progress: Progress,
    failures: list[str],
) -> None:
    """Images in chunks through the segmenter's pipeline, then the videos one at a time (a
    video uses the whole pipeline itself)."""
    videos: list[Input] = []
    images: list[Input] = []
    for item in inputs:
        if item.video:
            videos.append(item)
        else:
            images.append(item)
            if len(images) >= 256:  # bounded: a chunk at a time through the pipeline
                _run_images(segmenter, images, out_dir, options, writer, progress, failures)
                images = []
    if images:
        _run_images(segmenter, images, out_dir, options, writer, progress, failures)
    for item in videos:
        _run_video(segmenter, item, out_dir, options, writer, progress, failures)


def _record_outputs(out_dir: Path, paths: dict[str, Path]) -> dict[str, list[Any]]:
    return {
        kind: [path.relative_to(out_dir).as_posix(), path.stat().st_size]
        for kind, path in paths.items()
    }


def _guard_input(item: Input, out_dir: Path, names: dict[str, str]) -> None:
    """Refuse to write over this input itself (a last check: symlinks can hide it)."""
    for name in names.values():
        target = out_dir / name
        with contextlib.suppress(OSError):
            if target.exists() and os.path.samefile(target, item.path):
                raise InputError(
                    f"{item.path}: its output {target} would overwrite it; choose another --out"
                )


def domain_warning(result: SegmentationResult, path: Path | str) -> str:
    """One line for a picture unlike the model's training data."""
    trained_on = f" ({result.domain})" if result.domain else ""
    return (
        f"warning: {path}: does not look like what {result.model_name} was trained on"
        f"{trained_on}: its labels are likely wrong (out-of-domain score "
        f"{result.domain_score:.2f}); for such pictures use another --model"
    )


def _failed(
    item: Input, message: str, writer: ManifestWriter, progress: Progress, failures: list[str]
) -> None:
    text = message if str(item.path) in message else f"{item.path}: {message}"
    progress.write(f"error: {text}")
    record = {
        "input": str(item.path),
        "kind": "video" if item.video else "image",
        "status": "error",
        "error": text,
    }
    writer.write(item, "error", {}, record)
    progress.mine.failed += 1
    failures.append(str(item.path))
    progress.update()


# Images whose outputs are being written in the background while the model runs on the next
# ones: encoding an overlay PNG takes about half as long as the model on a 480×360 photo, and
# zlib and file writes release the GIL. Bounded, so that memory stays flat.
WRITES_IN_FLIGHT = 4
# What an image's summary record takes from ``SegmentationResult.to_dict``.
IMAGE_RECORD_FIELDS = ("width", "height", "out_of_domain", "domain_score", "classes", "timings")


def _run_images(
    segmenter: Any,
    items: list[Input],
    out_dir: Path,
    options: BatchOptions,
    writer: ManifestWriter,
    progress: Progress,
    failures: list[str],
) -> None:
    """Segment ``items`` in order; each result's files are written by a background thread
    while the model works on the next images. The manifest is written here, in input order:
    ``writing`` before a result's files are submitted, ``done`` once they are all in place."""
    results = segmenter.imap((item.path for item in items), errors="return")
    in_flight: deque[tuple[Input, SegmentationResult, Future[dict[str, Path]]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segformer-write") as pool:
        try:
            for item, result in zip(items, results, strict=True):
                if isinstance(result, SegformerError):
                    _failed(item, str(result), writer, progress, failures)
                    continue
                names = output_names(item.stem, None, options.save)
                try:
                    _guard_input(item, out_dir, names)
                except SegformerError as exc:
                    _failed(item, str(exc), writer, progress, failures)
                    continue
                writer.write(item, "writing", {kind: [name, None] for kind, name in names.items()})
                saved = pool.submit(
                    result.save,
                    out_dir,
                    item.stem,
                    opacity=options.opacity,
                    legend=options.legend,
                    kinds=options.save,
                )
                in_flight.append((item, result, saved))
                while len(in_flight) > WRITES_IN_FLIGHT:
                    _finish_image(*in_flight.popleft(), out_dir, writer, progress, failures)
        finally:
            # Also on an interruption: the files being written are finished and recorded.
            while in_flight:
                _finish_image(*in_flight.popleft(), out_dir, writer, progress, failures)


def _finish_image(
    item: Input,
    result: SegmentationResult,
    saved: Future[dict[str, Path]],
    out_dir: Path,
    writer: ManifestWriter,
    progress: Progress,
    failures: list[str],
) -> None:
    """Wait for one image's files and record it as done (or failed)."""
    try:
        paths = saved.result()
    except SegformerError as exc:
        _failed(item, str(exc), writer, progress, failures)
        return
    except OSError as exc:
        _failed(item, f"cannot write outputs ({exc.strerror or exc})", writer, progress, failures)
        return
    outputs = _record_outputs(out_dir, paths)
    described = result.to_dict()
    record = {
        "input": str(item.path),
        "kind": "image",
        "status": "ok",
        "outputs": {kind: name for kind, (name, _) in outputs.items()},
        **{key: described[key] for key in IMAGE_RECORD_FIELDS},
    }
    if result.out_of_domain:
        progress.write(domain_warning(result, item.path))
    writer.write(item, "done", outputs, record)
    progress.mine.segmented += 1
    progress.update()


def _run_video(
    segmenter: Any,
    item: Input,
    out_dir: Path,
    options: BatchOptions,
    writer: ManifestWriter,
    progress: Progress,
    failures: list[str],
) -> None:

    names = output_names(item.stem, item.path, options.save)
    video_path, csv_path = out_dir / names["overlay"], out_dir / names["frames_csv"]
    try:
        _guard_input(item, out_dir, names)
        writer.write(item, "writing", {kind: [name, None] for kind, name in names.items()})
        result = segment_video(
            segmenter,
            item.path,
            video_path,
            stats_csv=csv_path,
            opacity=options.opacity,
            legend=options.legend,
            codec=options.codec,
            max_frames=options.max_frames,
            show_progress=options.show_progress and progress.ranks.world_size == 1,
        )
    except SegformerError as exc:
        _failed(item, str(exc), writer, progress, failures)
        return
    data = result.to_dict()
    outputs = _record_outputs(out_dir, {"overlay": video_path, "frames_csv": csv_path})
    record = {
        "input": str(item.path),
        "kind": "video",
        "status": "ok",
        "outputs": {kind: name for kind, (name, _) in outputs.items()},
        "width": result.width,
        "height": result.height,
        "frames": result.frames,
        "fps": data["fps"],
        "codec": result.codec,
        "padded": result.padded,
        "classes": [{"name": n, "share": s} for n, s in data["class_shares"].items()],
        "seconds": data["seconds"],
    }
    writer.write(item, "done", outputs, record)
    progress.mine.segmented += 1
    progress.update()


# ---------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------
SUMMARY_COLUMNS = (
    "input",
    "kind",
    "status",
    "error",
    "width",
    "height",
    "frames",
    "top_classes",
    "total_ms",
    "outputs",
)


def _csv_row(r: dict[str, Any]) -> list[Any]:
    classes = r.get("classes") or []
    top = "; ".join(f"{c['name']} {c['share'] * 100:.1f}%" for c in classes[:5])
    if r["kind"] == "image":
        total_ms = r.get("timings", {}).get("total_ms", "")
    else:
        total_ms = round(r["seconds"] * 1000, 1) if "seconds" in r else ""
    outputs = " ".join(sorted((r.get("outputs") or {}).values()))
    return [
        r["input"],
        r["kind"],
        r["status"],
        r.get("error", ""),
        r.get("width", ""),
        r.get("height", ""),
        r.get("frames", ""),
        top,
        total_ms,
        outputs,
    ]


def write_summary(
    out_dir: Path,
    plan: InputPlan,
    manifest: Manifest,
    segmenter: Any,
    report: BatchReport,
    ranks: Ranks,
) -> dict[str, Any]:
    """``summary.json`` and ``summary.csv``: one record per input in enumeration order (this
    run's or, for skipped ones, the earlier run's), streamed to temporary files and renamed.
    Returns the summary without its ``results``."""

    counts = {"inputs": 0, "succeeded": 0, "failed": 0}
    report.failures = []
    with (
        atomic_path(out_dir / "summary.json") as json_tmp,
        atomic_path(out_dir / "summary.csv") as csv_tmp,
        open(json_tmp, "w", encoding="utf-8") as json_file,
        open(csv_tmp, "w", newline="", encoding="utf-8") as csv_file,
    ):
        writer = csv.writer(csv_file, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        json_file.write('{\n  "results": [')
        for item in plan:
            if isinstance(item, Problem):
                if item.level != "error":
                    continue
                record = {
                    "input": item.text,
                    "kind": "unknown",
                    "status": "error",
                    "error": item.reason,
                }
            else:
                record = manifest.record(item) or {
                    "input": str(item.path),
                    "kind": "video" if item.video else "image",
                    "status": "error",
                    "error": "not processed (a rank stopped before reaching it)",
                }
            counts["inputs"] += 1
            counts["succeeded" if record["status"] == "ok" else "failed"] += 1
            if record["status"] != "ok" and len(report.failures) < 20:
                report.failures.append(record["input"])
            _write_result(json_file, record, counts["inputs"] == 1)
            writer.writerow(_csv_row(record))
        head = {
            "model": segmenter.name,
            "mode": segmenter.mode.to_dict(),
            "device": segmenter.device,
            "backend": getattr(segmenter.engine, "backend", None),
            "precision": getattr(segmenter.engine, "precision", None),
            **counts,
            "skipped": report.counts.skipped,
            "segmented_now": report.counts.segmented,
            "ranks": ranks.world_size,
            "seconds": round(report.seconds, 3),
            "images_per_second": round(report.images_per_second, 3)
            if report.images_per_second
            else None,
        }
        json_file.write("\n  ],\n" + json.dumps(head, indent=2)[2:] + "\n")
    return head


def _write_result(file: TextIO, record: dict[str, Any], first: bool) -> None:
    text = json.dumps(record, indent=2)
    file.write(("\n" if first else ",\n") + "\n".join("    " + line for line in text.splitlines()))


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """``summary.json`` as a dict (a convenience for scripts and tests)."""
    return json.loads(Path(path).read_text())


__all__ = [
    "DEFAULT_SAVE",
    "OUTPUT_KINDS",
    "BatchOptions",
    "BatchReport",
    "Input",
    "InputError",
    "InputPlan",
    "Manifest",
    "Problem",
    "Ranks",
    "default_threads",
    "output_names",
    "run_batch",
    "shard",
    "write_summary",
]
