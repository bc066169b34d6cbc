"""The allocator choice made before torch starts (segformer.tools.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segformer.tools import allocator

FAKE_TCMALLOC = "/opt/lib/libtcmalloc_minimal.so.4"


@pytest.fixture
def with_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: FAKE_TCMALLOC)


@pytest.fixture
def without_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)


def test_tcmalloc_is_preloaded_in_front_of_what_was_there(with_tcmalloc):
    assert allocator.environment({}) == {"LD_PRELOAD": FAKE_TCMALLOC}
    assert allocator.environment({"LD_PRELOAD": "libx.so"}) == {
        "LD_PRELOAD": f"{FAKE_TCMALLOC} libx.so"
    }


def test_without_tcmalloc_glibc_is_tuned_keeping_other_tunables(without_tcmalloc):
    tunables = allocator.environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2"})["GLIBC_TUNABLES"]
    assert tunables.split(":") == ["glibc.rtld.nns=2", *allocator.GLIBC_TUNING]


@pytest.mark.parametrize(
    "env",
    [
        {"SEGFORMER_ALLOCATOR": "system"},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
        {"LD_PRELOAD": FAKE_TCMALLOC},
    ],
    ids=["system-asked", "jemalloc-there", "tcmalloc-there"],
)
def test_nothing_changes_when_asked_or_already_in_place(with_tcmalloc, env):
    assert allocator.environment(env) == {}


def test_glibc_choice_tunes_glibc_even_with_tcmalloc_present(with_tcmalloc):
    assert "GLIBC_TUNABLES" in allocator.environment({"SEGFORMER_ALLOCATOR": "glibc"})


def test_openvino_commands_get_tuned_glibc_never_a_preload(with_tcmalloc):
    # OpenVINO's CPU plugin aborts with tcmalloc preloaded (openvinotoolkit/openvino#29025).
    for env in ({}, {"SEGFORMER_ALLOCATOR": "tcmalloc"}):
        assert set(allocator.environment(env, allow_preload=False)) == {"GLIBC_TUNABLES"}
    assert allocator.environment({"SEGFORMER_ALLOCATOR": "system"}, allow_preload=False) == {}


def _run_script(tmp_path: Path, choice: str) -> list[str]:
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys\n"
        "from segformer.tools.allocator import allocator_in_use, use_fast_allocator\n"
        "use_fast_allocator(sys.argv[1:], script=True)\n"
        "print(allocator_in_use()); print(sys.argv[1:]); print(os.environ.get('SEGFORMER_ALLOCATOR_SET'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env.pop("SEGFORMER_ALLOCATOR_SET", None)
    env["SEGFORMER_ALLOCATOR"] = choice
    done = subprocess.run(
        [sys.executable, str(script), "a", "b c"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the allocator choice is Linux-only"
)
def test_a_script_re_executes_itself_once_with_its_arguments(tmp_path):
    assert _run_script(tmp_path, "glibc") == ["glibc (tuned)", "['a', 'b c']", "1"]
    assert _run_script(tmp_path, "system") == ["glibc", "['a', 'b c']", "None"]
