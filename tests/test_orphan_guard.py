"""The orphan guard's last act: unlinking the POSIX shared memory and semaphores its dying vLLM process maps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from parityrl.engines.orphan_guard import unlink_mapped_shared_memory, unlink_run_weight_buffers


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_only_the_mapped_psm_segments_are_unlinked(tmp_path):
    ours = Path(f"/dev/shm/psm_parityrl_test_{os.getpid()}")
    semaphore = Path(f"/dev/shm/sem.mp-parityrl{os.getpid()}")  # a multiprocessing lock of vLLM's queues
    other = Path(f"/dev/shm/parityrl-test-{os.getpid()}")  # shared memory too, but not a vLLM queue
    unmapped = Path(f"/dev/shm/psm_parityrl_unmapped_{os.getpid()}")  # another process's segment
    for path in (ours, semaphore, other, unmapped):
        path.write_bytes(b"x")
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f00-7f10 rw-s 00000000 00:1a 101 {ours}\n"
        f"7f10-7f20 rw-s 00000000 00:1a 102 {other}\n"
        f"7f18-7f19 rw-s 00000000 00:1a 105 {semaphore}\n"
        f"7f20-7f30 rw-s 00000000 00:1a 103 /dev/shm/psm_gone (deleted)\n"
        "7f30-7f40 r-xp 00000000 08:01 104 /usr/lib/libc.so.6\n"
    )
    try:
        assert unlink_mapped_shared_memory(str(maps)) == sorted([str(ours), str(semaphore)])
        assert not ours.exists() and not semaphore.exists() and other.exists() and unmapped.exists()
    finally:
        for path in (ours, semaphore, other, unmapped):
            path.unlink(missing_ok=True)


def test_only_the_dead_runs_weight_buffers_are_unlinked(tmp_path):
    dead_run, live_run = 4242, 4243
    theirs = [tmp_path / f"parityrl-weights-{dead_run}-a1b2", tmp_path / f"parityrl-weights-{dead_run}-c3d4"]
    others = [tmp_path / f"parityrl-weights-{live_run}-e5f6", tmp_path / f"parityrl-weights-{dead_run}0-g7h8"]
    for path in theirs + others:
        path.write_bytes(b"x")
    staging = tmp_path / f"parityrl-weights-{dead_run}-dir9"  # the `file` transport's directory
    staging.mkdir()
    (staging / "weights.safetensors").write_bytes(b"x")
    assert unlink_run_weight_buffers(dead_run, str(tmp_path)) == sorted(str(p) for p in [*theirs, staging])
    assert all(p.exists() for p in others) and not staging.exists()
