"""Use tcmalloc for the command line and the server when the system has it.

PyTorch on CPU allocates and frees large buffers all the time; glibc's malloc returns them to
the kernel and faults them back in, which made inference ~1.5x slower on our test VM. The
allocator must be chosen before the process starts, so the CLI re-executes itself once with
``LD_PRELOAD`` set. ``SEGFORMER_ALLOCATOR=system`` turns this off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
_MARK = "SEGFORMER_ALLOCATOR_SET"


def find_tcmalloc() -> str | None:
    for candidate in TCMALLOC_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def allocator_in_use() -> str:
    """'tcmalloc' when it is preloaded into this process, else 'glibc'."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"


def use_fast_allocator(argv: list[str]) -> None:
    """Re-exec ``segformer`` with tcmalloc preloaded, once, when it exists and is not in use."""
    if os.environ.get("SEGFORMER_ALLOCATOR", "").lower() == "system" or os.environ.get(_MARK):
        return
    if allocator_in_use() == "tcmalloc" or "torch" in sys.modules:
        return  # too late once torch is loaded: its allocations already went to glibc
    library = find_tcmalloc()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (
        f"{library} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else library
    )
    env[_MARK] = "1"
    try:
        os.execve(sys.executable, [sys.executable, "-m", "segformer.cli", *argv], env)
    except OSError:
        return  # keep going with the system allocator rather than fail
