"""House style: the linter passes (ruff, configured in pyproject.toml) and each algorithm script stays a readable
length. Skipped where ruff is not installed (it is in requirements-dev.txt)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
    ruff = shutil.which("ruff") or (shutil.which("ruff", path=os.path.dirname(sys.executable)))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("script", ["scan.py", "profeat.py", "deepcluster.py"])
def test_each_algorithm_script_is_at_most_725_lines_of_at_most_120_characters(script):
    lines = open(os.path.join(ROOT, script)).read().splitlines()
    assert len(lines) <= 725 and max(map(len, lines)) <= 120
