"""stlm-train / stlm-eval: end to end on the generated and the real sample, and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stlm_train.cli import eval_main, main, train_main

REPO = Path(__file__).resolve().parents[2]
METRICS = {"i_auroc", "p_auroc", "aupro", "p_ap", "f1_max", "fnr"}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m stlm_train.cli ...`` in a fresh process (what the console scripts run)."""
    env = dict(os.environ)  # the package is installed: no PYTHONPATH needed
    return subprocess.run([sys.executable, "-m", "stlm_train.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_outputs(run: Path) -> dict:
    ckpt = torch.load(run / "model.ckpt", map_location="cpu", weights_only=True)
    assert {"image", "pixel", "method"} <= set(ckpt["thresholds"])
    train_keys = {"steps", "epochs", "seconds", "seed", "teacher", "config", "data", "category", "losses"}
    assert train_keys <= set(ckpt["train"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train", "thresholds", "eval"} <= set(metrics)
    return metrics


def test_builtin_end_to_end_train_then_eval(tmp_path):
    run = tmp_path / "run"
    p = cli("train", "--data", "builtin", "--config", "small", "--steps", "4", "--out", str(run), "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    metrics = check_outputs(run)
    assert metrics["train"]["steps"] == 4 and metrics["train"]["config"] == "small"
    assert METRICS <= set(metrics["eval"]["fa"]) and METRICS <= set(metrics["eval"]["tlm"])
    out_json = tmp_path / "eval.json"
    e = cli("eval", "--ckpt", str(run / "model.ckpt"), "--data", str(run / "data"), "--json", str(out_json))
    assert e.returncode == 0, e.stderr[-2000:]
    assert "I-AUROC" in e.stdout and "FA" in e.stdout and "TLM" in e.stdout
    res = json.loads(out_json.read_text())
    assert METRICS <= set(res["fa"]) and METRICS <= set(res["tlm"])
    # evaluating the same model on the same images reproduces the training-time evaluation
    assert res["fa"]["i_auroc"] == pytest.approx(metrics["eval"]["fa"]["i_auroc"], abs=1e-9)
    assert res["tlm"]["p_auroc"] == pytest.approx(metrics["eval"]["tlm"]["p_auroc"], abs=1e-9)
    assert res["thresholds"]["image"] == pytest.approx(metrics["thresholds"]["image"])


def test_real_sample_end_to_end(sample_dir, tmp_path):
    run = tmp_path / "bottle"
    code = train_main(["--data", str(sample_dir), "--category", "bottle", "--config", "small", "--img-size", "128",
                       "--steps", "2", "--texture-bank", "reference+self", "--out", str(run), "--quiet"])
    assert code == 0
    metrics = check_outputs(run)
    assert metrics["train"]["texture_bank"] == "reference+self"
    assert metrics["train"]["n_train_images"] == 4 and metrics["thresholds"]["n_images"] == 1  # 5 images: hold 1
    assert metrics["train"]["augmentation"] == "rotation"  # bottle is a rotation category
    assert metrics["eval"]["n_images"] == 10 and metrics["eval"]["n_anomalous"] == 5
    out_json = tmp_path / "m.json"
    assert eval_main(["--ckpt", str(run / "model.ckpt"), "--data", str(sample_dir), "--json", str(out_json),
                      "--quiet"]) == 0
    res = json.loads(out_json.read_text())
    assert METRICS <= set(res["fa"]) and res["n_images"] == 10


def test_fa_loss_flag_matches_the_trainer_options():
    """--fa-loss is spelled in the CLI (no torch import for --help): its choices and default are the trainer's."""
    from stlm_train import cli as train_cli
    from stlm_train.training.options import DEFAULT_FA_LOSS, FA_LOSSES

    assert train_cli.FA_LOSS_CHOICES == FA_LOSSES and train_cli.DEFAULT_FA_LOSS_NAME == DEFAULT_FA_LOSS


def test_student_init_flag_matches_the_trainer_options():
    from stlm_train import cli as train_cli
    from stlm_train.training.options import DEFAULT_STUDENT_INIT, STUDENT_INITS

    assert train_cli.STUDENT_INIT_CHOICES == STUDENT_INITS
    assert train_cli.DEFAULT_STUDENT_INIT_NAME == DEFAULT_STUDENT_INIT


def test_train_images_flag_default_is_the_trainer_s():
    from stlm_train import cli as train_cli
    from stlm_train.training.options import DEFAULT_TRAIN_IMAGES

    assert train_cli.DEFAULT_TRAIN_IMAGES_NAME == DEFAULT_TRAIN_IMAGES


def test_fa_target_flag_matches_the_trainer_options():
    """--fa-target is spelled in the CLI as well: its choices and default are the trainer's."""
    from stlm_train import cli as train_cli
    from stlm_train.training.options import DEFAULT_FA_TARGET, FA_TARGETS

    assert train_cli.FA_TARGET_CHOICES == FA_TARGETS and train_cli.DEFAULT_FA_TARGET_NAME == DEFAULT_FA_TARGET


def test_fa_input_flag_matches_the_model_config():
    """--fa-input is spelled in the CLI as well: its choices are the model config's, its default the trainer's
    (the model config's own default stays the official product, what older checkpoints were)."""
    from stlm_train import cli as train_cli
    from stlm_train.config import DEFAULT_FA_INPUT, FA_INPUTS, FA_OUTPUTS, TRAIN_FA_INPUT
    from stlm_train.training import TrainOptions

    assert train_cli.FA_INPUT_CHOICES == FA_INPUTS and train_cli.DEFAULT_FA_INPUT_NAME == TRAIN_FA_INPUT
    assert train_cli.FA_OUTPUT_CHOICES == FA_OUTPUTS
    assert TrainOptions(data="builtin", out="unused").fa_input == TRAIN_FA_INPUT
    assert DEFAULT_FA_INPUT == "product"


def test_texture_bank_flag_matches_the_synthesizer_banks():
    from stlm_train import cli as train_cli
    from stlm_train.anomalies import DEFAULT_TEXTURE_BANK, TEXTURE_BANKS

    assert train_cli.TEXTURE_BANK_CHOICES == tuple(TEXTURE_BANKS)
    assert train_cli.DEFAULT_TEXTURE_BANK_NAME == DEFAULT_TEXTURE_BANK


def test_help_and_module_dispatch(capsys):
    for fn in (train_main, eval_main):
        assert fn(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--time-budget" in out and "--ckpt" in out and "--resume" in out
    assert main(["--help"]) == 0
    assert main(["train", "--help"]) == 0
    p = cli("eval", "--help")
    assert p.returncode == 0 and "--json" in p.stdout


def test_refinish_gives_the_fa_map_s_other_output_without_training(tmp_path, capsys):
    """stlm-train --refinish: the same weights finished with the head's output instead of the prior path (tire wants
    the head, the bottle sample the prior: a user compares both on their own images without a second training)."""
    run, head = tmp_path / "run", tmp_path / "head"
    assert train_main(["--data", "builtin", "--config", "small", "--steps", "2", "--out", str(run), "--quiet"]) == 0
    assert train_main(["--refinish", str(run), "--out", str(head), "--fa-output", "head", "--quiet"]) == 0
    a = torch.load(run / "model.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(head / "model.ckpt", map_location="cpu", weights_only=True)
    assert a["config"]["fa_output"] == "prior" and b["config"]["fa_output"] == "head"
    assert a["train"]["steps"] == b["train"]["steps"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # no step trained
    ma, mb = (json.loads((d / "metrics.json").read_text())["eval"] for d in (run, head))
    assert ma["tlm"]["p_auroc"] == pytest.approx(mb["tlm"]["p_auroc"], abs=1e-9)  # same students
    assert ma["fa"]["p_auroc"] != mb["fa"]["p_auroc"]  # another FA map
    capsys.readouterr()
    for argv, needle in ((["--fa-output", "head"], "is the run itself"), ([], "needs what to change"),
                         (["--fa-output", "head", "--steps", "5"], "--steps cannot be given with it")):
        out = run if needle == "is the run itself" else tmp_path / "x"
        assert train_main(["--refinish", str(run), "--out", str(out), *argv]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and needle in err[0], err


@pytest.fixture(scope="module")
def garbage(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("bad") / "teacher.pth"
    p.write_bytes(b"not a checkpoint at all")
    return p


@pytest.mark.parametrize("args, needle", [
    (["--data", "/nonexistent/root", "--out", "{tmp}/o"], "does not exist"),
    (["--data", "builtin", "--out", "{tmp}/o", "--format", "xml"], "'--format'"),
    (["--data", "builtin", "--out", "{tmp}/o", "--config", "huge"], "'--config'"),
    (["--data", "builtin", "--out", "{tmp}/o", "--img-size", "100"], "multiple of 64"),
    (["--data", "builtin", "--out", "{tmp}/o", "--steps", "2", "--epochs", "1"], "only one of"),
    (["--data", "builtin", "--out", "{tmp}/o", "--steps", "2", "--time-budget", "1"], "only one of"),
    (["--data", "builtin", "--out", "{tmp}/o", "--teacher", "{garbage}"], "not a readable PyTorch checkpoint"),
    (["--data", "builtin", "--out", "{tmp}/o", "--teacher", "/no/such/sam.pth"], "no such file"),
    (["--data", "builtin", "--out", "{tmp}/o", "--steps", "0", "--config", "small"], "positive"),
    (["--data", "builtin", "--out", "{tmp}/o", "--batch-size", "0", "--config", "small"], "batch-size"),
    (["--data", "builtin", "--out", "{tmp}/o", "--device", "tpu", "--config", "small"], "--device"),
    (["--out", "{tmp}/o"], "--data"),
    (["--data", "builtin"], "--out"),
    (["--data", "builtin", "--out", "{tmp}/o", "--resume"], "nothing to resume"),
    (["--data", "{tmp}", "--out", "{tmp}/o", "--config", "small"], "no train/test"),
    (["--data", "builtin", "--out", "{tmp}/o", "--bogus"], "No such option"),
    (["--data", "builtin", "--out", "{tmp}/o", "--fa-loss", "bce"], "'--fa-loss'"),
    (["--data", "builtin", "--out", "{tmp}/o", "--fa-target", "teacher"], "'--fa-target'"),
    (["--data", "builtin", "--out", "{tmp}/o", "--fa-input", "sum"], "'--fa-input'"),
    (["--data", "builtin", "--out", "{tmp}/o", "--fa-input", "product", "--fa-output", "prior"],
     "--fa-output prior needs --fa-input product+tlm or tlm"),
    (["--data", "builtin", "--out", "{tmp}/o", "--texture-bank", "dtd"], "'--texture-bank'"),
])
def test_train_errors_are_one_line(args, needle, tmp_path, garbage, capsys):
    argv = [a.format(tmp=tmp_path, garbage=garbage) for a in args]
    code = train_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("Error: "), err
    assert needle in err[0]
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("args, needle", [
    (["--ckpt", "/no/model.ckpt", "--data", "builtin"], "no such checkpoint"),
    (["--ckpt", "{garbage}", "--data", "builtin"], "not a readable PyTorch checkpoint"),
    (["--ckpt", "{garbage}", "--data", "/no/data"], "does not exist"),
    (["--ckpt", "{garbage}", "--data", "builtin", "--format", "xml"], "'--format'"),
    (["--ckpt", "{garbage}", "--data", "builtin", "--img-size", "65"], "multiple of 64"),
    (["--data", "builtin"], "--ckpt"),
])
def test_eval_errors_are_one_line(args, needle, tmp_path, garbage, capsys):
    code = eval_main([a.format(tmp=tmp_path, garbage=garbage) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("Error: ") and needle in err[0], err


def test_subprocess_error_has_no_traceback(tmp_path):
    p = cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", "small")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in p.stderr
    bad = cli("frobnicate")
    assert bad.returncode == 2 and bad.stderr.startswith("Error: unknown command")


def test_resume_through_the_cli(tmp_path, capsys):
    run = tmp_path / "r"
    base = ["--config", "small", "--out", str(run), "--quiet", "--no-eval"]
    assert train_main(["--data", "builtin", "--steps", "1", *base]) == 0
    # --data, --config and the seed come from the run; only the stopping rule is new
    assert train_main(["--out", str(run), "--steps", "2", "--resume", "--quiet", "--no-eval"]) == 0
    ckpt = torch.load(run / "model.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["train"]["steps"] == 2 and ckpt["config"]["name"] == "small"
    capsys.readouterr()
    assert train_main(["--out", str(run), "--steps", "3", "--resume", "--seed", "7"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed 7 differs" in err[0]
