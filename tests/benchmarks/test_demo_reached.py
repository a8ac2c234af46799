"""`make demo` states what the trainer reaches: its own run and the measured table it quotes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _demo():
    spec = importlib.util.spec_from_file_location("stlm_demo_script", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EVAL = {"fa": {"i_auroc": 0.9, "p_auroc": 0.71, "aupro": 0.5}, "tlm": {"i_auroc": 1.0, "p_auroc": 0.86, "aupro": 0.66}}


def _summary(variant: str) -> dict:
    row = {"variant": variant, "n": 3, "seeds": [0, 1, 2], "steps": 1281.0}
    for i, k in enumerate(("fa_i_auroc", "fa_p_auroc", "fa_aupro", "tlm_i_auroc", "tlm_p_auroc", "tlm_aupro")):
        row[k] = [0.5 + i / 100, 0.01 * (i + 1)]
    return {"meta": {}, "summary": [row], "runs": []}


def test_quotes_the_newest_measured_table(tmp_path: Path) -> None:
    demo = _demo()
    (tmp_path / "accuracy_mvtec_bottle_xs.json").write_text(json.dumps(_summary("current")))
    lines = demo.reached_lines(EVAL, 400, True, tmp_path)
    assert lines[0].startswith("this run (400 steps") and "0.90 / 0.71 / 0.50" in lines[0] and "0.86" in lines[0]
    assert "accuracy_mvtec_bottle_xs.md" in lines[1] and "0.50 ± 0.01 / 0.51 ± 0.02" in lines[1]
    (tmp_path / "localisation_bottle_xs.json").write_text(json.dumps(_summary("current")))
    assert "localisation_bottle_xs.md" in demo.reached_lines(EVAL, 400, True, tmp_path)[1]


def test_states_only_what_was_measured(tmp_path: Path) -> None:
    demo = _demo()
    assert len(demo.reached_lines(EVAL, 400, False, tmp_path)) == 1  # no table: no quoted number
    (tmp_path / "localisation_generated.json").write_text(json.dumps(_summary("r2")))  # no 'current' row
    assert len(demo.reached_lines(EVAL, 400, False, tmp_path)) == 1
    assert "TLM map n/a" in demo.reached_lines({"fa": EVAL["fa"], "tlm": None}, 400, False, tmp_path)[0]
