"""benchmarks/accuracy.py: seeds x variants really train and evaluate, summarise, and resume."""
from __future__ import annotations

import json

import pytest

from stlm_bench import accuracy


def test_variants_differ_only_in_their_changes():
    assert accuracy.VARIANTS["current"] == {}
    for name, change in accuracy.CHANGES.items():
        assert accuracy.VARIANTS[f"v0+{name}"] == {**accuracy.V0, **change}
        assert set(accuracy.VARIANTS[f"current-{name}"]) == set(change)
    assert accuracy.resolve_variants("v0,ablation")[0] == "v0"
    with pytest.raises(SystemExit, match="unknown variant 'x'"):
        accuracy.resolve_variants("x")
    assert accuracy.overrides_of("fa-grad-0.3") == {"fa_grad": "0.3"}
    assert accuracy.overrides_of("tiled-512") == {"work_size": 512}
    assert accuracy.overrides_of("tiled-512+fa-grad-0.3") == {"work_size": 512, "fa_grad": "0.3"}
    assert accuracy.resolve_variants("tiled-512+fa-grad-0.3") == ["tiled-512+fa-grad-0.3"]
    assert accuracy.overrides_of("fa-loss-focal") == {"fa_loss": "focal"}
    assert accuracy.overrides_of("tiled-512+fa-loss-focal") == {"work_size": 512, "fa_loss": "focal"}
    assert accuracy.overrides_of("fa-loss-dice") == {"fa_loss": "focal+l1+dice"}
    assert accuracy.overrides_of("tiled-512+fa-target-changed") == {"work_size": 512, "fa_target": "changed"}
    assert accuracy.overrides_of("amp") == {"amp": True} and accuracy.overrides_of("fp32") == {"amp": False}
    assert accuracy.overrides_of("tiled-512+amp") == {"work_size": 512, "amp": True}
    assert accuracy.overrides_of("tiled-512+teacher-reference") == {"work_size": 512, "teacher_recipe": "reference"}
    from stlm_train.modeling.teacher import TEACHER_RECIPES
    named = {accuracy.overrides_of(f"teacher-{r}")["teacher_recipe"] for r in ("local", "reference")}
    assert named == {"local", "reference"} and named <= set(TEACHER_RECIPES)
    for bad in ("fa-grad-1.5", "fa-grad-0", "tiled-512+x"):
        with pytest.raises(SystemExit, match="unknown variant"):
            accuracy.resolve_variants(bad)


def test_two_seeds_of_two_variants_train_evaluate_and_resume(tmp_path, capsys):
    argv = ["--data", "generated", "--config", "small", "--img-size", "128", "--steps", "1", "--seeds", "0,1",
            "--variants", "v0,current", "--name", "t", "--out-dir", str(tmp_path)]
    assert accuracy.main(argv) == 0
    d = json.loads((tmp_path / "t.json").read_text())
    assert [(r["variant"], r["seed"]) for r in d["runs"]] == [("v0", 0), ("v0", 1), ("current", 0), ("current", 1)]
    assert all(0.0 <= r["fa_i_auroc"] <= 1.0 and r["steps"] == 1 for r in d["runs"])
    assert [r["amp"] for r in d["runs"]] == [False] * 4  # the precision the steps ran in (default fp32)
    assert d["runs"][0]["overrides"]["teacher_seed"] == 0 and d["runs"][1]["overrides"]["teacher_seed"] == 1
    summary = {s["variant"]: s for s in d["summary"]}
    v = [r["fa_p_auroc"] for r in d["runs"] if r["variant"] == "v0"]
    assert summary["v0"]["n"] == 2 and summary["v0"]["fa_p_auroc"][0] == pytest.approx(sum(v) / 2)
    assert "| current | 2 | 1 |" in (tmp_path / "t.md").read_text()
    capsys.readouterr()
    assert accuracy.main(argv) == 0  # everything is already there: nothing is trained again
    assert "seed 0:" not in capsys.readouterr().out
    assert "; then" not in json.loads((tmp_path / "t.json").read_text())["meta"]["command"]
    later = [*argv[:-6], "--variants", "current", "--name", "t", "--out-dir", str(tmp_path)]
    assert accuracy.main(later) == 0  # a second command merged into the file is recorded with the first
    command = json.loads((tmp_path / "t.json").read_text())["meta"]["command"]
    assert command.count("python -m stlm_bench.accuracy") == 2 and "; then" in command


def test_an_stfpm_run_has_no_tlm_columns(tmp_path, sample_dir, capsys):
    argv = ["--data", str(sample_dir), "--config", "stfpm", "--img-size", "64", "--steps", "1", "--seeds", "0",
            "--name", "s", "--out-dir", str(tmp_path)]
    assert accuracy.main(argv) == 0
    d = json.loads((tmp_path / "s.json").read_text())
    [run] = d["runs"]
    assert run["tlm_i_auroc"] is None and 0.0 <= run["fa_i_auroc"] <= 1.0
    assert d["summary"][0]["tlm_i_auroc"] == [None, None]
    assert "| current | 1 | 1 |" in (tmp_path / "s.md").read_text()
    capsys.readouterr()


def test_runs_merge_when_the_same_data_folder_is_spelled_differently(tmp_path, monkeypatch):
    data = tmp_path / "root" / "sample"
    data.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "root")
    meta = {"data": "sample", "config": "paper", "img_size": 256, "budget": "400 steps"}
    assert accuracy.same_setup(meta, {**meta, "data": str(data)})  # relative then absolute: one folder
    assert accuracy.same_setup({**meta, "data": "generated"}, {**meta, "data": "generated"})
    assert not accuracy.same_setup(meta, {**meta, "data": "generated"})
    assert not accuracy.same_setup(meta, {**meta, "budget": "150 steps"})


def test_merged_results_keep_every_command_and_machine_once():
    """A resumed sweep (same command again) must not drop the history of the rows it merges."""
    first, second = "python -m stlm_bench.accuracy --variants v0", "python -m stlm_bench.accuracy --variants current"
    history = accuracy.merged_history(accuracy.merged_history(None, first), second)
    assert history == f"{first}; then {second}"
    assert accuracy.merged_history(history, second) == history  # rerun of the second: unchanged
    assert accuracy.merged_history(history, first) == history
    assert accuracy.merged_history("AMD EPYC, 2 cores", "Intel Xeon, 2 cores") == "AMD EPYC, 2 cores; then Intel Xeon, 2 cores"


def test_untiled_and_tiled_rows_on_the_images_own_grid(tmp_path):
    argv = ["--data", "generated", "--config", "small", "--img-size", "128", "--steps", "1", "--seeds", "0",
            "--variants", "current,tiled-192", "--eval-grid", "original", "--name", "tiles", "--out-dir", str(tmp_path)]
    assert accuracy.main(argv) == 0
    d = json.loads((tmp_path / "tiles.json").read_text())
    assert d["meta"]["eval_grid"] == "original"
    rows = {r["variant"]: r for r in d["runs"]}
    assert rows["tiled-192"]["overrides"] == {"work_size": 192} and rows["current"]["overrides"] == {}
    assert all(r["eval_ms_per_image"] > 0 and 0.0 <= r["fa_p_auroc"] <= 1.0 for r in rows.values())
    md = (tmp_path / "tiles.md").read_text()
    assert "eval ms/img" in md and "| tiled-192 | 1 | 1 |" in md and "own grid" in md
    assert accuracy.resolve_variants("tiling") == ["current", "tiled-512", "tiled-768"]
    with pytest.raises(SystemExit, match=r"--variants tiled-64: --work-size: must be at least the tile size 128"):
        accuracy.main([*argv[:11], "tiled-64", *argv[12:]])


def test_keep_runs_keeps_each_trained_checkpoint(tmp_path):
    keep = tmp_path / "runs"
    argv = ["--data", "generated", "--config", "small", "--img-size", "128", "--steps", "1", "--seeds", "0",
            "--variants", "current", "--name", "k", "--out-dir", str(tmp_path), "--keep-runs", str(keep)]
    assert accuracy.main(argv) == 0
    assert (keep / "current-s0" / "model.ckpt").is_file()


def test_post_training_rows_are_measured_on_their_base_run_s_weights(tmp_path):
    from stlm_train.training import POST_TRAINING_OPTIONS

    assert accuracy.post_training_changes("r2+recalibrated-bn", "r2") == {"student_bn": "recalibrate"}
    assert accuracy.post_training_changes("current-fpr-threshold", "current") == {"threshold_target": None}
    for variant, base in accuracy.DERIVED_FROM.items():
        assert set(accuracy.post_training_changes(variant, base)) <= set(POST_TRAINING_OPTIONS)
    assert accuracy.run_order(["r2+fpr-threshold", "current"]) == ["r2", "r2+fpr-threshold", "current"]
    argv = ["--data", "generated", "--config", "small", "--img-size", "128", "--steps", "1", "--seeds", "0",
            "--variants", "r2+recalibrated-bn", "--name", "d", "--out-dir", str(tmp_path)]
    assert accuracy.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "d.json").read_text())["runs"]}
    base, derived = rows["r2"], rows["r2+recalibrated-bn"]  # the base was trained first, in the same command
    assert "derived_from" not in base and derived["derived_from"] == "r2" and derived["steps"] == base["steps"] == 1
    assert derived["train_seconds"] == base["train_seconds"]  # the same steps, not a second training
    args = accuracy.argparse.Namespace(data="generated", eval_grid="model")
    with pytest.raises(SystemExit, match=r"weights of r2 seed 3, but .*r2-s3/last.ckpt is not there"):
        accuracy.run_one("r2+fpr-threshold", 3, args, tmp_path / "empty")


def test_rows_trained_before_a_default_changed_are_superseded_not_reused(tmp_path, capsys):
    """A ``current`` row recorded before the FA prior became the trainer's default (no ``fa_input`` field: the
    official product) is moved to ``superseded`` and trained again; a row that pinned its input is reused."""
    from stlm_train.config import TRAIN_FA_INPUT

    argv = ["--data", "generated", "--config", "small", "--img-size", "128", "--steps", "1", "--seeds", "0",
            "--variants", "current,current-tlm-prior", "--name", "t", "--out-dir", str(tmp_path)]
    assert accuracy.main(argv) == 0
    path = tmp_path / "t.json"
    d = json.loads(path.read_text())
    assert {r["variant"]: r["fa_input"] for r in d["runs"]} == {"current": TRAIN_FA_INPUT,
                                                                "current-tlm-prior": "product"}
    for r in d["runs"]:  # as rows written before the field existed
        del r["fa_input"]
    path.write_text(json.dumps(d))
    capsys.readouterr()
    assert accuracy.main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if " seed 0: FA" in line] == ["current"]  # trained again
    d = json.loads(path.read_text())
    assert [(r["variant"], r.get("fa_input")) for r in d["superseded"]] == [("current", None)]
    md = (tmp_path / "t.md").read_text()
    assert md.index("| current | 1 |") < md.index("## Superseded rows") < md.index(
        "| current (product, prior output) | 1 |")
    assert sorted((r["variant"], r.get("fa_input")) for r in d["runs"]) == [("current", TRAIN_FA_INPUT),
                                                                            ("current-tlm-prior", None)]
    assert accuracy.expected_fa_input("r2") == "product" and accuracy.expected_fa_input("v0") == "product"


def test_a_row_finished_before_the_prior_output_default_is_refinished_from_its_kept_run(tmp_path, capsys):
    """A ``current`` row whose model output the head (before ``fa_output`` "prior" became the trainer's choice)
    is superseded, and its kept run is finished again with today's output instead of trained again; the paired
    ``current-prior-output`` row re-finishes the same weights with the head's output; a kept run that trained
    otherwise is refused."""
    import torch

    from stlm_train.training import TrainError

    keep = tmp_path / "runs"
    argv = ["--data", "generated", "--config", "small", "--img-size", "128", "--steps", "1", "--seeds", "0",
            "--variants", "current", "--name", "o", "--out-dir", str(tmp_path), "--keep-runs", str(keep)]
    assert accuracy.main(argv) == 0
    path = tmp_path / "o.json"
    d = json.loads(path.read_text())
    assert d["runs"][0]["fa_output"] == "prior" and "refinished_from" not in d["runs"][0]
    del d["runs"][0]["fa_output"]  # as a row, and its run, from before the field: the head's output
    path.write_text(json.dumps(d))
    last = keep / "current-s0" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    del state["options"]["fa_output"]
    torch.save(state, last)
    capsys.readouterr()
    assert accuracy.main(argv) == 0
    assert " seed 0: FA" in capsys.readouterr().out
    d = json.loads(path.read_text())
    row = d["runs"][0]
    assert row["fa_output"] == "prior" and row["refinished_from"] == str(keep / "current-s0") and row["steps"] == 1
    assert [r.get("fa_output") for r in d["superseded"]] == [None]
    assert (keep / "current-s0-refinished" / "model.ckpt").is_file()
    paired = [*argv[:11], "current-prior-output", *argv[12:]]
    assert accuracy.main(paired) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["runs"]}
    assert rows["current-prior-output"]["fa_output"] == "head"
    assert rows["current-prior-output"]["derived_from"] == "current"
    args = accuracy.argparse.Namespace(data="generated", category=None, config="small", img_size=128, steps=2,
                                       time_budget=None)
    with pytest.raises(TrainError, match=r"other steps \(1\) than current seed 0"):
        accuracy.kept_run_changes(keep / "current-s0", "current", 0, args)
    args.steps = 1
    with pytest.raises(TrainError, match="other fa_input"):
        accuracy.kept_run_changes(keep / "current-s0", "current-tlm-prior", 0, args)
    changes, had = accuracy.kept_run_changes(keep / "current-s0", "current", 0, args)
    assert changes == {"fa_output": None} and had.fa_input == "product+tlm" and had.fa_output == "head"


def test_a_kept_run_on_every_image_is_not_an_auto_row_where_auto_keeps_fewer(tmp_path):
    """A run trained on all 191 images (before ``train_images`` "auto") must train again as ``current``; one whose
    images were few enough for "auto" to keep all of them, or whose count "auto" resolved, is the same row."""
    import torch

    many, few = tmp_path / "many", tmp_path / "few"
    for run, n in ((many, 191), (few, 13)):
        run.mkdir()
        torch.save({"train": {"n_train_images": n}}, run / "model.ckpt")
    assert not accuracy._same_training_images(many, "all", "auto")
    assert accuracy._same_training_images(few, "all", "auto")
    assert accuracy._same_training_images(many, "23", "auto")
    assert accuracy._same_training_images(many, "all", "all") and not accuracy._same_training_images(few, "23", "all")
