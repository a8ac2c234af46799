"""The trainer on the small config at 128 px: data order, reproducibility, resume, outputs, AMP, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stlm_train.checkpoint import read_file
from stlm_train.data import make_generated_dataset
from stlm_train.training import (DEFAULT_STEPS, EpochBatchSampler, TrainError, TrainOptions, holdout_split,
                              summarize_history, train)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_generated_dataset(tmp_path_factory.mktemp("gen") / "d", n_train=8, n_test_good=3, n_test_bad=3,
                                  size=128, seed=0)


def opts(data_root: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=str(data_root), out=str(out), config="small", img_size=128, steps=2, progress=False,
                evaluate=False, save_every=0)
    base.update(kw)
    return TrainOptions(**base)


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# ---------------------------------------------------------------------------------------------- units


def test_holdout_split_is_deterministic_disjoint_and_keeps_at_least_one():
    assert holdout_split(5, 0.2) == ([0, 1, 3, 4], [2])
    assert holdout_split(2, 0.2) == ([0], [1])
    tr, ho = holdout_split(16, 0.2)
    assert len(ho) == 3 and not set(tr) & set(ho) and sorted(tr + ho) == list(range(16))
    assert holdout_split(16, 0.2) == (tr, ho)
    with pytest.raises(TrainError, match="at least 2 training images"):
        holdout_split(1, 0.2)
    with pytest.raises(TrainError):
        holdout_split(10, 0.0)


def test_auto_train_images_and_the_spread_subset():
    from stlm_train.training.sampling import AUTO_TRAIN_MIN_IMAGES, auto_train_images, spread_subset

    assert auto_train_images(191, 1119 * 2) == 23  # 2238 samples / 100 visits each
    assert auto_train_images(191, 100 * 2) == AUTO_TRAIN_MIN_IMAGES  # never fewer than the floor...
    assert auto_train_images(8, 100 * 2) == 8  # ...nor more than there are
    assert auto_train_images(191, 10**6) == 191 and auto_train_images(191, None) == 191  # None: epochs asked for
    assert spread_subset([10, 11, 12, 13, 14, 15], 3) == [11, 13, 15]  # the middle of each third
    assert spread_subset([1, 2], 5) == [1, 2]
    picked = spread_subset(list(range(191)), 23)
    assert len(set(picked)) == 23 and picked[0] < 10 and picked[-1] > 180  # the whole range, no repeats


def test_epoch_batch_sampler_order_sharding_and_restart():
    s = EpochBatchSampler(10, 3, seed=0)
    assert s.steps_per_epoch == 3  # 10 // 3, the remainder is dropped
    it = iter(s)
    batches = [next(it) for _ in range(7)]
    assert all(len(b) == 3 for b in batches)
    assert [b[0][0] for b in batches] == [0, 0, 0, 1, 1, 1, 2]  # epoch of each step
    epoch0 = [i for b in batches[:3] for _, i in b]
    assert len(set(epoch0)) == 9  # a permutation, no repeats within an epoch
    assert [i for b in batches[3:6] for _, i in b] != epoch0  # reshuffled each epoch
    again = iter(EpochBatchSampler(10, 3, seed=0, start_step=4))
    assert next(again) == batches[4]  # resuming continues the same stream
    r0 = [i for b in [EpochBatchSampler(8, 2, 0, rank=0, world_size=2).batch_at(k) for k in range(2)] for _, i in b]
    r1 = [i for b in [EpochBatchSampler(8, 2, 0, rank=1, world_size=2).batch_at(k) for k in range(2)] for _, i in b]
    assert sorted(r0 + r1) == list(range(8))  # ranks share an epoch without overlap
    tiny = EpochBatchSampler(1, 2, 0)  # fewer images than a batch: repeated cyclically
    assert tiny.steps_per_epoch == 1 and tiny.batch_at(0) == [(0, 0), (0, 0)]


def test_summarize_history():
    h = [[i + 1, 1.0 * i, 2.0, 3.0, 4.0, 10.0 + i, 0.5 * (i + 1)] for i in range(20)]
    s = summarize_history(h, points=5)
    assert s["first"]["plain"] == pytest.approx(0.5) and s["last"]["plain"] == pytest.approx(18.5)
    assert s["last"]["total"] == pytest.approx(28.5) and s["s_per_step_median"] == pytest.approx(0.5)
    assert len(s["curve"]) <= 5 and s["curve"][0][0] == 1
    assert summarize_history([])["first"] is None


# ---------------------------------------------------------------------------------------------- runs


def test_same_seed_same_weights_any_workers_and_other_seed_differs(data_root, tmp_path):
    a = train(opts(data_root, tmp_path / "a", steps=3))
    b = train(opts(data_root, tmp_path / "b", steps=3, num_workers=1))
    c = train(opts(data_root, tmp_path / "c", steps=3, seed=1))
    assert a.steps == b.steps == 3
    assert max_diff(weights(a), weights(b)) == 0.0
    assert max_diff(weights(a), weights(c)) > 1e-3


def test_resume_gives_the_uninterrupted_weights(data_root, tmp_path):
    straight = train(opts(data_root, tmp_path / "straight", steps=4))
    first = train(opts(data_root, tmp_path / "resumed", steps=2))
    state = read_file(tmp_path / "resumed" / "last.ckpt")
    assert state["step"] == 2 and {"model", "optim", "rng", "teacher", "history", "options"} <= set(state)
    assert state["teacher"]["kind"] == "builtin" and "state_dict" in state["teacher"]
    assert {"opt_students", "opt_fa"} <= set(state["optim"])
    assert first.steps == 2
    resumed = train(opts(data_root, tmp_path / "resumed", steps=4, resume=True), explicit={"steps", "resume"})
    assert resumed.steps == 4
    assert max_diff(weights(straight), weights(resumed)) <= 1e-6
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    hist_a = read_file(tmp_path / "straight" / "last.ckpt")["history"]
    hist_b = read_file(tmp_path / "resumed" / "last.ckpt")["history"]
    assert hist_a.shape == (4, 7) and float((hist_a[:, :6] - hist_b[:, :6]).abs().max()) <= 1e-6


def test_refinish_measures_a_post_training_change_on_the_run_s_own_weights(data_root, tmp_path):
    """A row that differs only after the last step (students' statistics, threshold policy) re-finished from the
    base run's last.ckpt equals a run trained with that option from the start, and the base's own result."""
    from stlm_train.training import refinish

    r2 = dict(steps=2, evaluate=True, student_bn="train", threshold_target=None)
    base = train(opts(data_root, tmp_path / "base", **r2))
    again = refinish(tmp_path / "base", tmp_path / "again", {})
    assert again.steps == 2 and max_diff(weights(base), weights(again)) == 0.0
    assert again.thresholds["image"] == base.thresholds["image"]
    assert again.metrics["fa"]["p_auroc"] == base.metrics["fa"]["p_auroc"]
    change = {"student_bn": "recalibrate", "threshold_target": "fpr<=0.05"}
    derived = refinish(tmp_path / "base", tmp_path / "derived", change)
    trained = train(opts(data_root, tmp_path / "trained", **{**r2, **change}))
    assert max_diff(weights(trained), weights(derived)) <= 1e-6
    moved = [k for k in weights(base) if "running_mean" in k and not torch.equal(weights(base)[k], weights(derived)[k])]
    assert moved and all(k.startswith(("plain.", "denoising.")) for k in moved)  # the students' BatchNorm only
    assert derived.thresholds["target"] == "fpr<=0.05" and base.thresholds["target"] is None
    assert derived.thresholds["image"] == pytest.approx(trained.thresholds["image"], abs=1e-6)
    assert derived.metrics["fa"]["p_auroc"] == pytest.approx(trained.metrics["fa"]["p_auroc"], abs=1e-6)
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["thresholds"]["target"] is None  # untouched
    with pytest.raises(TrainError, match="fa_grad changes the training steps"):
        refinish(tmp_path / "base", tmp_path / "x", {"fa_grad": "detached"})
    with pytest.raises(TrainError, match="student_bn 'train' -> 'frozen'"):
        refinish(tmp_path / "base", tmp_path / "x", {"student_bn": "frozen"})
    with pytest.raises(TrainError, match="is the run itself"):
        refinish(tmp_path / "base", tmp_path / "base", {})


def test_train_images_picks_a_spread_subset_kept_on_resume_and_refinish(data_root, tmp_path, monkeypatch):
    """A count trains on that many distinct images (stored as the resolved count, so a resume and a re-finish
    use the same ones); 'auto' on a step budget picks as many as the steps visit ~100 times each."""
    from stlm_train.training import refinish
    from stlm_train.training import sampling

    three = train(opts(data_root, tmp_path / "three", steps=2, train_images="3"))
    state = read_file(tmp_path / "three" / "last.ckpt")
    assert state["options"]["train_images"] == "3"
    assert read_file(tmp_path / "three" / "model.ckpt")["train"]["n_train_images"] == 3
    every = train(opts(data_root, tmp_path / "every", steps=2, train_images="all"))
    assert max_diff(weights(three), weights(every)) > 1e-4  # other images, other steps
    more = train(opts(data_root, tmp_path / "three", steps=3, resume=True), explicit={"steps", "resume"})
    assert more.steps == 3 and read_file(tmp_path / "three" / "model.ckpt")["train"]["n_train_images"] == 3
    again = refinish(tmp_path / "three", tmp_path / "three_again", {})
    assert max_diff(weights(more), weights(again)) == 0.0
    assert read_file(tmp_path / "three_again" / "model.ckpt")["train"]["n_train_images"] == 3
    # 6 trainable images, a floor of 2: 2 steps x batch 2 = 4 samples -> the floor
    monkeypatch.setattr(sampling, "AUTO_TRAIN_MIN_IMAGES", 2)
    auto = train(opts(data_root, tmp_path / "auto", steps=2, train_images="auto"))
    assert read_file(tmp_path / "auto" / "last.ckpt")["options"]["train_images"] == "2"
    assert read_file(tmp_path / "auto" / "model.ckpt")["train"]["n_train_images"] == 2
    epochs = train(opts(data_root, tmp_path / "epochs", steps=None, epochs=1, train_images="auto"))  # every image
    assert read_file(tmp_path / "epochs" / "last.ckpt")["options"]["train_images"] == "all"
    assert epochs.steps == 3  # 6 images / batch 2


def test_time_budget_probe_steps_leave_no_trace(data_root, tmp_path):
    """'auto' under a time budget times a few real steps to plan its images; they must not change the run."""
    from stlm_train.config import get_config
    from stlm_train.training.distributed import DistInfo
    from stlm_train.training.run import _Run
    from stlm_train.training.state import rng_state

    o = opts(data_root, tmp_path / "probe", steps=None, time_budget=0.05, train_images="all").validate()
    run = _Run(o, get_config("small", 128), None, DistInfo(), None)
    run.setup()
    before, optim, rng = weights(run), {k: v for k, v in run.trainer.state_dict().items()}, rng_state()
    assert run.probe_seconds_per_step() > 0
    assert max_diff(before, weights(run)) == 0.0  # weights and BatchNorm statistics restored
    assert str(run.trainer.state_dict()) == str(optim)  # the optimisers' state too (no moments yet)
    assert torch.equal(rng_state()["torch"], rng["torch"])
    budget = train(opts(data_root, tmp_path / "budget", steps=None, time_budget=0.05, train_images="auto"))
    assert read_file(tmp_path / "budget" / "last.ckpt")["options"]["train_images"] == "all"  # 6 < the floor 16
    assert budget.steps >= 1


def test_resume_errors(data_root, tmp_path):
    with pytest.raises(TrainError, match="last.ckpt not found"):
        train(opts(data_root, tmp_path / "none", resume=True))
    train(opts(data_root, tmp_path / "r", steps=1))
    with pytest.raises(TrainError, match="--seed 5 differs"):
        train(opts(data_root, tmp_path / "r", steps=2, seed=5, resume=True), explicit={"seed"})


def test_outputs_thresholds_and_metrics(data_root, tmp_path):
    out = tmp_path / "run"
    res = train(opts(data_root, out, steps=2, evaluate=True))
    ckpt = read_file(out / "model.ckpt")
    thr = ckpt["thresholds"]
    assert {"image", "pixel", "method"} <= set(thr) and "held-out good" in thr["method"]
    assert thr["n_images"] == 2 and len(thr["held_out"]) == 2  # 20 % of 8, never trained on
    # calibration range of the normalized score: held-out good + their pseudo-anomalous versions, threshold inside
    assert thr["score_min"] <= thr["image"] <= thr["score_max"] and thr["score_max"] > thr["score_min"]
    tr = ckpt["train"]
    for key in ("steps", "epochs", "seconds", "seed", "teacher", "config", "data", "category", "losses"):
        assert key in tr, key
    assert tr["steps"] == 2 and tr["config"] == "small" and tr["n_train_images"] == 6
    assert tr["losses"]["steps_averaged"] == 1  # 2 steps: "last" is the final step
    assert tr["losses"]["last"]["total"] == pytest.approx(res.losses["total"], abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"train", "thresholds", "eval", "losses"} <= set(metrics)
    for name in ("fa", "tlm"):
        assert {"i_auroc", "p_auroc", "aupro", "p_ap", "f1_max", "fnr"} <= set(metrics["eval"][name])
    assert metrics["eval"]["n_images"] == 6 and metrics["eval"]["n_anomalous"] == 3
    from stlm_train import load_model

    m = load_model(out / "model.ckpt")
    assert max_diff(m.state_dict(), res.model.state_dict()) == 0.0


def test_stopping_rules(data_root, tmp_path):
    r = train(opts(data_root, tmp_path / "e", steps=None, epochs=1))
    assert r.steps == 3 and r.epochs == pytest.approx(1.0)  # 6 training images / batch 2
    t = train(opts(data_root, tmp_path / "t", steps=None, time_budget=0.0001))
    assert t.steps >= 1
    with pytest.raises(TrainError, match="only one of"):
        train(opts(data_root, tmp_path / "x", steps=2, epochs=1))
    with pytest.raises(TrainError, match="positive"):
        train(opts(data_root, tmp_path / "x", steps=0))
    assert DEFAULT_STEPS > 0


def test_amp_bf16_on_cpu_runs_with_finite_losses(data_root, tmp_path):
    r = train(opts(data_root, tmp_path / "amp", steps=1, amp=True, img_size=64))  # bf16 is emulated on many CPUs
    assert all(torch.isfinite(torch.tensor(v)) for v in r.losses.values())
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


def test_distributed_two_processes_gloo_end_identical(data_root, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from stlm_train.training import TrainOptions, train
        out = sys.argv[1]
        r = train(TrainOptions(data={str(data_root)!r}, out=out, config="small", img_size=128, steps=2,
                               progress=False, evaluate=False, save_every=0))
        torch.save({{k: v.detach().clone() for k, v in r.model.state_dict().items()}},
                   os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
    """))
    out = tmp_path / "ddp"
    env = dict(os.environ)  # the package is installed: no PYTHONPATH needed
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert max_diff(r0, r1) == 0.0
    ckpt = read_file(out / "model.ckpt")
    assert ckpt["train"]["world_size"] == 2 and ckpt["train"]["steps"] == 2
    assert max_diff(ckpt["state_dict"], r0) == 0.0
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".ckpt") == ["last.ckpt", "model.ckpt"]


def test_resume_of_a_run_saved_before_the_recipe_knobs_keeps_its_old_recipe(tmp_path):
    """A last.ckpt written before teacher_seed/teacher_recipe/texture_bank/resize existed was trained with
    the first recipe; resuming it must not silently switch to today's defaults mid-run."""
    from stlm_train.training import merge_resume_options

    old = {k: v for k, v in TrainOptions(data="builtin", out=str(tmp_path), seed=4).identity().items()
           if k not in ("teacher_seed", "teacher_recipe", "texture_bank", "resize", "student_bn", "threshold_target",
                         "fa_grad", "fa_loss", "fa_target", "fa_input", "train_images")}
    merged = merge_resume_options(TrainOptions(data="", out=str(tmp_path), resume=True), old, set())
    assert (merged.teacher_seed, merged.teacher_recipe, merged.texture_bank, merged.resize) == (4, "v1", "v1", "bilinear")
    assert (merged.student_bn, merged.threshold_target) == ("train", None)  # official BatchNorm, quantile rule
    assert merged.fa_grad == "students"  # the FA loss trained the students too, as in the official code
    assert merged.fa_loss == "focal+l1"  # and the FA head learned from focal + L1 (paper eq. 8)
    assert merged.fa_target == "mask"  # on every pixel of the pseudo mask
    assert merged.fa_input == "product"  # of the students' product, as in the official code
    assert merged.student_init == "random"  # seeded students
    assert merged.train_images == "all"  # on every training image (the default too; a count is kept as stored)
    assert merged.builtin_teacher_seed == 4
    fresh = TrainOptions(data="builtin", out=str(tmp_path), seed=4)
    assert fresh.builtin_teacher_seed == 1004 and fresh.resize == "area"


@pytest.mark.parametrize("field,value,needle", [
    ("teacher_recipe", "fancy", "teacher_recipe must be one of local, reference, v1"),
    ("student_bn", "eval", "student_bn must be one of recalibrate, frozen, train"),
    ("fa_grad", "both", "fa_grad must be one of detached, students or a number in (0, 1)"),
    ("fa_grad", "1.5", "fa_grad must be one of detached, students or a number in (0, 1)"),
    ("fa_loss", "bce", "fa_loss must be one of focal+l1, focal"),
    ("fa_target", "teacher", "fa_target must be one of mask, changed"),
    ("fa_input", "sum", "fa_input must be one of product, absdiff"),
    ("threshold_target", "auc", "--threshold-target: expected f1, fpr<=A"),
    ("texture_bank", "dtd", "texture_bank must be one of reference, v1"),
    ("resize", "nearest", "resize must be one of area, bilinear"),
    ("holdout", 1.0, "--holdout must be in (0, 1)"),
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("student_init", "mobile_sam", "student_init must be one of random, teacher"),
    ("train_images", "0", "--train-images must be all or auto or a positive count, got '0'"),
    ("train_images", "some", "--train-images must be all or auto or a positive count, got 'some'"),
])
def test_options_are_validated_in_one_place(tmp_path, field, value, needle):
    opts = TrainOptions(data="builtin", out=str(tmp_path), **{field: value})
    with pytest.raises(TrainError) as e:
        opts.validate()
    assert needle in str(e.value)


def test_student_init_teacher_is_stlm_only_and_excludes_the_mobile_sam_init(tmp_path):
    sam = tmp_path / "mobile_sam.pt"
    sam.write_bytes(b"x")
    for kw in ({"config": "stfpm"}, {"init_mobile_sam": str(sam)}):
        with pytest.raises(TrainError, match="--student-init teacher: STLM only, and not with --init-mobile-sam"):
            TrainOptions(data="builtin", out=str(tmp_path / "r"), student_init="teacher", **kw).validate()


def test_a_folder_that_holds_a_run_is_refused_without_resume_or_overwrite(data_root, tmp_path):
    train(opts(data_root, tmp_path / "r", steps=1))
    with pytest.raises(TrainError, match=r"already holds a run \(last.ckpt, model.ckpt\); use --resume"):
        train(opts(data_root, tmp_path / "r", steps=1))
    before = (tmp_path / "r" / "model.ckpt").stat().st_mtime_ns
    train(opts(data_root, tmp_path / "r", steps=1, overwrite=True))
    assert (tmp_path / "r" / "model.ckpt").stat().st_mtime_ns != before


def test_non_finite_loss_stops_the_run_before_the_update_and_keeps_last_ckpt(data_root, tmp_path, monkeypatch):
    """Fault injection: the loss turns NaN at the 3rd step; last.ckpt (saved at step 2) must survive
    untouched and the error names the step."""
    import stlm_train.training.loop as loop

    real, calls = loop.stlm_loss, []

    def nan_at_third(*a, **k):
        terms = real(*a, **k)
        calls.append(1)
        return terms._replace(total=terms.total * float("nan")) if len(calls) == 3 else terms

    monkeypatch.setattr(loop, "stlm_loss", nan_at_third)
    out = tmp_path / "nan"
    with pytest.raises(TrainError, match=r"loss is .* at step 3; stopped before the update"):
        train(opts(data_root, out, steps=5, save_every=2))
    state = torch.load(out / "last.ckpt", weights_only=False)
    assert state["step"] == 2 and not (out / "model.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ctrl_c_mid_step_saves_nothing_and_keeps_the_last_consistent_state(data_root, tmp_path, monkeypatch):
    """Ctrl-C inside the 3rd step (forward/backward/update not finished): saving then would mix two steps,
    so nothing is written; last.ckpt from step 2 survives and --resume continues from it."""
    import stlm_train.training.loop as loop

    real, calls, saved = loop.stlm_loss, [], {}
    out = tmp_path / "ctrl_c"

    def interrupt_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            saved["bytes"] = (out / "last.ckpt").read_bytes()  # the state of step 2, as it was
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "stlm_loss", interrupt_at_third)
    with pytest.raises(KeyboardInterrupt):
        train(opts(data_root, out, steps=5, save_every=2))
    assert (out / "last.ckpt").read_bytes() == saved["bytes"]  # not rewritten with a half-done step
    state = torch.load(out / "last.ckpt", weights_only=False)
    assert state["step"] == 2 and not (out / "model.ckpt").exists()
    monkeypatch.setattr(loop, "stlm_loss", real)
    res = train(opts(data_root, out, steps=5, save_every=2, resume=True))
    assert res.steps == 5 and (out / "model.ckpt").exists()


@pytest.mark.parametrize("fa_input", ["product", "product+tlm", "tlm"])
@pytest.mark.parametrize("mode", ["detached", "0.25", "students"])
def test_fa_loss_reaches_the_students_only_when_not_detached(mode, fa_input):
    """fa_grad="detached": the FA head's loss trains the FA head alone; "students" (official): the students too;
    a number: that fraction of the students' gradient, the same forward values (with the TLM prior path too)."""
    from dataclasses import replace

    from stlm_train import STLM
    from stlm_train.config import get_config
    from stlm_train.training import TrainGraph
    from stlm_train.training.options import fa_grad_scale

    def grads(scale: float) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        torch.manual_seed(0)
        # float64: with "tlm" two large log-distance gradients reach the students and cancel, float32 rounding
        # would hide the factor
        model = STLM(replace(get_config("small").with_img_size(64), fa_input=fa_input)).double().train()
        if model.fa_head.prior is not None:  # its head starts at zero output: give every layer a gradient
            torch.nn.init.normal_(model.fa_head.head[-1].weight, std=0.1)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        _, _, logits = TrainGraph(model, scale)(x)
        logits.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fa_head.head.parameters())
        return logits.detach(), [p.grad for p in (*model.plain.parameters(), *model.denoising.parameters(),
                                                  *model.decoder.parameters())]

    scale = fa_grad_scale(mode)
    logits, student = grads(scale)
    if scale == 0:
        assert all(g is None for g in student)
        return
    full_logits, full = grads(1.0)
    assert torch.equal(logits, full_logits)  # the forward pass does not depend on the gradient factor
    pairs = [(g, f) for g, f in zip(student, full) if f is not None and f.abs().sum() > 0]
    assert pairs
    for g, f in pairs:
        torch.testing.assert_close(g, scale * f, rtol=1e-6, atol=1e-12)


def test_fa_loss_option_reaches_the_step_and_the_run_record(data_root, tmp_path, monkeypatch):
    """fa_loss="focal": every step's total leaves L1 out (still reported), and metrics.json records the choice;
    the official "focal+l1" sums all four terms."""
    import stlm_train.training.loop as loop

    real, seen = loop.stlm_loss, []

    def spy(*a, **k):
        terms = real(*a, **k)
        seen.append((k.get("l1", True), k.get("dice", False), terms))
        return terms

    monkeypatch.setattr(loop, "stlm_loss", spy)
    for mode, l1, dice in (("focal", False, False), ("focal+l1", True, False), ("focal+l1+dice", True, True)):
        seen.clear()
        out = tmp_path / mode
        train(opts(data_root, out, steps=2, fa_loss=mode))
        assert [(a, b) for a, b, _ in seen] == [(l1, dice), (l1, dice)]
        for _, _, t in seen:
            expected = t.plain + t.denoising + t.focal + (t.l1 if l1 else 0.0) + (t.dice if dice else 0.0)
            assert float(t.total) == pytest.approx(float(expected), abs=1e-6) and float(t.l1) > 0
            assert (t.dice is not None) == dice
        assert json.loads((out / "metrics.json").read_text())["train"]["fa_loss"] == mode


def test_fa_target_option_reaches_the_step_and_the_run_record(data_root, tmp_path, monkeypatch):
    """fa_target="changed" reaches every step's loss and metrics.json records it."""
    import stlm_train.training.loop as loop

    real, seen = loop.stlm_loss, []

    def spy(*a, **k):
        seen.append(k.get("fa_target"))
        return real(*a, **k)

    monkeypatch.setattr(loop, "stlm_loss", spy)
    train(opts(data_root, tmp_path / "o", steps=2, fa_target="changed"))
    assert seen == ["changed", "changed"]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["train"]["fa_target"] == "changed"


@pytest.mark.parametrize("mode", ["absdiff", "product+tlm", "tlm"])
def test_fa_input_option_reaches_the_model_the_checkpoint_and_the_run_record(data_root, tmp_path, mode):
    """fa_input is part of the model: the trained model, its checkpoint (with the prior path's weights, and so
    every engine exported from it) and metrics.json carry it; STFPM has no FA head and refuses it."""
    from stlm_train import load_model

    res = train(opts(data_root, tmp_path / "o", steps=2, fa_input=mode))
    assert res.model.cfg.fa_input == mode
    loaded = load_model(tmp_path / "o" / "model.ckpt")
    assert loaded.cfg.fa_input == mode
    assert (loaded.fa_head.prior is not None) == (mode != "absdiff")
    if loaded.fa_head.prior is not None:  # trained, saved and read back: not the initial (1, 1) / 0
        torch.testing.assert_close(loaded.fa_head.prior.weight, res.model.fa_head.prior.weight)
        assert not torch.equal(loaded.fa_head.prior.weight, torch.ones_like(loaded.fa_head.prior.weight))
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())["train"]
    assert record["fa_input"] == mode
    # the trainer's choice of output: the prior path alone where the head has one
    assert loaded.cfg.fa_output == record["fa_output"] == ("head" if mode == "absdiff" else "prior")
    with pytest.raises(TrainError, match="--fa-input absdiff: STLM only"):
        TrainOptions(data="builtin", out=str(tmp_path / "s"), config="stfpm", fa_input="absdiff").validate()
    for ignored in ("product+tlm", "product"):  # the default, and what runs from before the field resume with
        TrainOptions(data="builtin", out=str(tmp_path / "s"), config="stfpm", fa_input=ignored).validate()


@pytest.mark.parametrize("fa_input", ["product", "product+tlm", "tlm"])
def test_every_model_parameter_is_in_exactly_one_optimizer(fa_input):
    """A parameter no optimiser holds never trains (the FA head's prior path once did not)."""
    from dataclasses import replace

    from stlm_train import STLM
    from stlm_train.config import get_config
    from stlm_train.training.loop import build_optimizers

    model = STLM(replace(get_config("small").with_img_size(64), fa_input=fa_input))
    held = [id(p) for opt in build_optimizers(model, TrainOptions(data="builtin", out="unused"))
            for group in opt.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())


def test_fa_output_head_and_its_checks(data_root, tmp_path):
    """--fa-output head keeps the head's output on a prior-path head (the map then differs from the prior-alone
    one on the same weights: refinish changes only the output); prior needs the path and an STLM config."""
    from stlm_train import load_model
    from stlm_train.training import refinish

    res = train(opts(data_root, tmp_path / "h", steps=2, fa_output="head"))
    assert res.model.cfg.fa_output == "head" and load_model(tmp_path / "h" / "model.ckpt").cfg.fa_output == "head"
    again = refinish(tmp_path / "h", tmp_path / "p", {"fa_output": "prior"}, evaluate=False)
    prior = load_model(tmp_path / "p" / "model.ckpt")
    assert prior.cfg.fa_output == "prior" and again.steps == res.steps == 2
    torch.testing.assert_close(prior.fa_head.prior.weight, res.model.fa_head.prior.weight)
    x = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    assert (prior.predict(x).anomaly_map - res.model.predict(x).anomaly_map).abs().max() > 0
    torch.testing.assert_close(prior.predict(x).tlm_map, res.model.predict(x).tlm_map)
    with pytest.raises(TrainError, match="--fa-output prior needs --fa-input product\\+tlm or tlm"):
        TrainOptions(data="builtin", out=str(tmp_path / "x"), fa_input="product", fa_output="prior").validate()
    with pytest.raises(TrainError, match="--fa-output prior: STLM only"):
        TrainOptions(data="builtin", out=str(tmp_path / "s"), config="stfpm", fa_output="prior").validate()
    assert TrainOptions(data="builtin", out="o", fa_input="product").resolved_fa_output() == "head"
