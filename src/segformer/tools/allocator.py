"""A faster memory allocator for the command line and the server, chosen before PyTorch starts.

PyTorch on the CPU allocates and frees large buffers on every forward pass. glibc's malloc
serves big blocks with fresh ``mmap`` calls and gives them back to the kernel on ``free``, so
every inference pays the page faults again: on our test VM that made transformers' B0 ~1.5×
slower (286 ms instead of 191 ms at 512²). Two cures, in order of preference:

1. **tcmalloc** (``LD_PRELOAD``), when the system has it (Debian/Ubuntu:
   ``apt install libgoogle-perftools4`` or ``libtcmalloc-minimal4``): it keeps freed memory
   for reuse.
2. Otherwise **glibc tunables** (``GLIBC_TUNABLES``): a larger, fixed mmap threshold and a
   large trim threshold keep freed blocks in the heap, and transparent huge pages make the
   faults that remain cheaper.

Both only work when set before the process starts, so ``segformer`` (every subcommand,
``serve`` included) re-executes itself once with the environment set; ``environment()`` gives
the same variables for launching anything else (a uvicorn worker, a benchmark subprocess).

OpenVINO's CPU plugin works with tcmalloc preloaded only because the OpenVINO engine loads
OpenVINO's libhwloc before the plugin starts (TBB would otherwise load it with
``RTLD_DEEPBIND``, bound to glibc's ``free``, and the process aborts with "free(): invalid
pointer"; see ``segformer.inference.backends.openvino._load_hwloc_normally``).

``SEGFORMER_ALLOCATOR``: ``auto`` (default: tcmalloc if present, else tuned glibc),
``tcmalloc``, ``glibc`` (tuned glibc), or ``system`` (change nothing).

OpenVINO's CPU plugin used to abort (``free(): invalid pointer``) with tcmalloc preloaded;
``segformer.inference.backends.openvino.core`` now loads its ``libhwloc`` so that it runs
with any allocator. ``segformer quantize`` (``OPENVINO_COMMANDS``) still gets tuned glibc:
NNCF's calibration has not been measured under tcmalloc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/local/lib/libtcmalloc_minimal.so.4",
)
# glibc's largest allowed mmap threshold on 64-bit systems is 32 MiB; blocks below it come from
# the heap. Freed heap memory is returned only above the trim threshold (here 1 GiB), and
# hugetlb=1 asks for transparent huge pages on what is still mapped (glibc ≥ 2.35).
GLIBC_TUNING = (
    "glibc.malloc.mmap_threshold=33554432",
    "glibc.malloc.trim_threshold=1073741824",
    "glibc.malloc.top_pad=67108864",
    "glibc.malloc.hugetlb=1",
)
CHOICES = ("auto", "tcmalloc", "glibc", "system")
# Subcommands that run OpenVINO, which cannot live with a preloaded allocator (see above).
OPENVINO_COMMANDS = frozenset({"quantize"})
_MARK = "SEGFORMER_ALLOCATOR_SET"


def find_tcmalloc() -> str | None:
    """The path of the system's tcmalloc library, if there is one."""
    for candidate in TCMALLOC_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def allocator_in_use() -> str:
    """``tcmalloc`` when it is preloaded into this process, ``glibc (tuned)`` when the
    tunables are set, else ``glibc``."""
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return "tcmalloc"
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc (tuned)"
    return "glibc"


def environment(base: dict[str, str] | None = None, allow_preload: bool = True) -> dict[str, str]:
    """The environment variables to add so that a new process starts with the preferred
    allocator (empty when ``SEGFORMER_ALLOCATOR=system``, on non-Linux systems, or when the
    choice is in place already). ``allow_preload=False``: never tcmalloc (for OpenVINO)."""
    env = os.environ if base is None else base
    choice = env.get("SEGFORMER_ALLOCATOR", "auto").strip().lower() or "auto"
    if not allow_preload and choice in ("auto", "tcmalloc"):
        choice = "glibc"
    if choice == "system" or not sys.platform.startswith("linux"):
        return {}
    preload = env.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload:
        return {}
    library = find_tcmalloc() if choice in ("auto", "tcmalloc") else None
    if library is not None:
        return {"LD_PRELOAD": f"{library} {preload}".strip()}
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.mmap_threshold" in tunables:
        return {}
    return {"GLIBC_TUNABLES": ":".join(filter(None, [tunables, *GLIBC_TUNING]))}


def use_fast_allocator(argv: list[str], script: bool = False) -> None:
    """Re-execute this process once with ``environment()`` applied, when it changes anything:
    as ``segformer`` with ``argv``, or with ``script`` as this Python script (``sys.argv[0]``,
    for benchmark scripts). Called first thing by the command line; too late once torch is
    imported (its memory already came from the old allocator), so then it does nothing."""
    if os.environ.get(_MARK) or "torch" in sys.modules:
        return
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    changes = environment(allow_preload=command not in OPENVINO_COMMANDS)
    if not changes:
        return
    env = {**os.environ, **changes, _MARK: "1"}
    program = [sys.argv[0]] if script else ["-m", "segformer.cli"]
    try:
        os.execve(sys.executable, [sys.executable, *program, *argv], env)
    except OSError:
        return  # keep going with the system allocator rather than fail
