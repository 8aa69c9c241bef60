"""torch inductor's compile cache after a killed compile: the truncated libraries are found and deleted
before an engine starts (else every later engine dies loading them), whole ones and ones being written are kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from filelock import FileLock

from parityrl.engines.vllm_host import repair_compile_cache, truncated_elf

LIBRARY = Path(torch.__file__).parent / "lib" / "libtorch_global_deps.so"


def cached(cache: Path, key: str, content: bytes) -> Path:
    path = cache / key[1:3] / f"{key}.main.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_truncated_libraries_are_deleted_and_whole_or_locked_ones_kept(tmp_path):
    whole = LIBRARY.read_bytes()
    assert not truncated_elf(LIBRARY)
    kept = cached(tmp_path, "cwhole", whole)
    empty = cached(tmp_path, "cempty", b"")  # what a link killed at once leaves (seen: "file too short")
    cut = cached(tmp_path, "ccut", whole[: len(whole) - 100])  # the section headers at the end are missing
    header_only = cached(tmp_path, "chead", whole[:40])
    written_now = cached(tmp_path, "cbusy", b"")
    (tmp_path / "locks").mkdir()
    with FileLock(str(tmp_path / "locks" / "cbusy.lock")):  # another process is compiling this kernel
        removed = repair_compile_cache(tmp_path)
    assert sorted(removed) == sorted([empty, cut, header_only])
    assert kept.exists() and written_now.exists()
    assert repair_compile_cache(tmp_path) == [written_now]  # its lock is free now


def test_an_object_file_cut_short_counts_as_truncated(tmp_path):
    shutil.copy(LIBRARY, tmp_path / "whole.o")
    (tmp_path / "cut.o").write_bytes(LIBRARY.read_bytes()[:-1])
    assert not truncated_elf(tmp_path / "whole.o") and truncated_elf(tmp_path / "cut.o")
