"""bench/gpu_check.sh --dry-run: the GPU check's own logic (every item, its table, its verdict,
the $OUT layout) end to end on CPU tensors of tiny sizes, so a lent GPU's minutes are not spent
finding a bug in the script. About a minute on two busy cores."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ("tests", "fused_update", "pcie", "overlap", "peak", "methods", "fsdp_offload")


@pytest.mark.slow  # about 45 s on two cores: the whole dry run, seven items in fresh processes
def test_dry_run_writes_every_items_table_and_one_verdict_each(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for item in ITEMS:
        verdicts = [line for line in summary.splitlines() if line.startswith(f"VERDICT {item}:")]
        assert len(verdicts) == 1, f"{item}: {verdicts}"
        assert verdicts[0].split(":")[1].strip() in ("PASS", "FAIL", "SKIP"), verdicts[0]
        assert "exited" not in verdicts[0] and "timed out" not in verdicts[0], verdicts[0]
        for suffix in (".md", ".json", ".log"):
            assert (tmp_path / f"{item}{suffix}").is_file(), item + suffix
    assert (tmp_path / "overlap_trace.json").stat().st_size > 0
    assert "| format |" in (tmp_path / "fused_update.md").read_text()
    try:
        import hift.fsdp  # noqa: F401
    except ImportError:  # a build without FSDP support says so instead of failing
        assert "VERDICT fsdp_offload: SKIP: skipped: hift has no FSDP support in this build" in summary
