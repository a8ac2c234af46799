"""Every ``python -m stlm_bench.<script>`` keeps the one-line-error rule: a bad input is ``Error: ...`` on one
line and a non-zero exit, never a traceback (benchmarks/output.run_main)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from stlm_bench.output import run_main


@pytest.mark.parametrize("script,args,needle", [
    ("large_image", ["--engine", "/no/such/engine"], "/no/such/engine"),
    ("accuracy", ["--data", "/no/such/data", "--steps", "1"], "/no/such/data"),
    ("fa_correction", ["--runs", "/no/such/model.ckpt"], "/no/such/model.ckpt"),
])
def test_scripts_bad_input_is_one_line(script, args, needle):
    r = subprocess.run([sys.executable, "-m", f"stlm_bench.{script}", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_run_main_lets_bugs_raise_and_passes_the_status(capsys):
    def bad_input() -> int:
        raise FileNotFoundError("--calib-data x: no such folder\n(expected images)")

    def bug() -> int:
        raise KeyError("a bug, not a bad input")

    assert run_main(bad_input) == 2
    assert capsys.readouterr().err == "Error: --calib-data x: no such folder (expected images)\n"
    assert run_main(lambda: 3) == 3 and run_main(lambda: None) == 0
    with pytest.raises(KeyError):
        run_main(bug)
