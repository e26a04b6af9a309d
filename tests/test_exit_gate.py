"""The learned exit gate (model.exit_gate, train.stage=exit_gate, --exit-criterion gate): its
targets by hand, the exit depths it gives against a hand loop, the refusals (no gate, bad stage
settings), weights without a gate, and the stage itself through `rdpt train`: only the gate
changes, bitwise, and a resumed run reaches exactly the uninterrupted losses."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch
from fixtures_model import SMALL_VOCAB, build_small_model

from pipeline.common.errors import RdptConfigError
from pipeline.eval.adaptive import ExitRule, evaluate_adaptive, exit_curves, score_tokens
from pipeline.eval.generate import GenerationConfig, generate
from pipeline.model.exit_gate import exit_targets

from fixtures_training import REPO, rdpt_train_command, step_losses, training_env

MAX_R = 6


def build_gate_model():
    """small_eval_model's model with a gate whose logits spread (std 1 weights): some
    positions exit early, some late."""
    model = build_small_model(exit_gate=True)
    with torch.no_grad():
        model.exit_gate.proj.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def gate_model():
    return build_gate_model()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SMALL_VOCAB, (3, 21), generator=g)
    return x[:, :-1], x[:, 1:]


def test_exit_targets_by_hand():
    ce = torch.tensor([3.0, 2.0, 1.995, 1.0]).view(4, 1, 1)
    y = exit_targets(ce, "next", min_gain=0.01, sharpness=200.0).flatten().tolist()
    gains = [1.0, 0.005, 0.995]  # CE_i - CE_{i+1}
    assert y == pytest.approx([1 / (1 + math.exp(-200 * (0.01 - g))) for g in gains], rel=1e-5)
    assert y[1] > 0.5 > y[0]  # the second iteration gains almost nothing: stop there
    y = exit_targets(ce, "remaining", min_gain=0.01, sharpness=200.0).flatten().tolist()
    gains = [2.0, 1.0, 0.995]  # CE_i - min(CE_{i+1..r}): the plateau at i = 2 is no exit
    assert y == pytest.approx([1 / (1 + math.exp(-200 * (0.01 - g))) for g in gains], rel=1e-5)
    assert max(y) < 1e-3
    with pytest.raises(ValueError, match="exit_gate.target"):
        exit_targets(ce, "best", 0.01, 200.0)


def test_balanced_gate_loss_pulls_both_classes_equally():
    """Three exit targets and one go-on target at a gate logit of 0: unweighted, the gradient
    pushes towards exit; balanced, the two classes cancel. Invalid positions count in neither."""
    from pipeline.training.stages.exit_gate import gate_bce

    y = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 1.0]]])  # [r - 1, B, S]
    valid = torch.tensor([[True, True, True, True, False]])
    for balance, expect in ((False, "exit"), (True, "even")):
        logits = torch.zeros_like(y, requires_grad=True)
        gate_bce(logits, y, valid, balance).backward()
        g = logits.grad[0, 0]
        assert g[4] == 0  # not a valid position
        total = float(g[:4].sum())  # d loss / d logit summed: < 0 means raise p_exit
        assert (total < -1e-3) if expect == "exit" else abs(total) < 1e-6, (balance, total)
    # the unweighted mean equals torch's own BCE over the valid entries
    logits = torch.randn_like(y)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., :4], y[..., :4])
    torch.testing.assert_close(gate_bce(logits, y, valid), want)


def test_gate_parameters_are_frozen_and_counted(gate_model):
    from pipeline.model.counting import closed_form_parameters, count_parameters

    assert count_parameters(gate_model) == closed_form_parameters(gate_model.cfg)
    assert count_parameters(gate_model)["exit_gate"] == 2 * 64 + 1
    gate = {id(p) for p in gate_model.exit_gate.parameters()}
    for name, p in gate_model.named_parameters():
        assert p.requires_grad == (id(p) not in gate), name  # only the gate stage trains it


def _continue_probs(model, inputs):
    """p_continue [max_r, B, S] after iterations 1..MAX_R, by the model's plain pieces."""
    with torch.no_grad():
        e = model.prelude(inputs)
        s = model.initial_state(e, "zero")
        out = []
        for _ in range(MAX_R):
            s = model.core_step(s, e)
            out.append(torch.sigmoid(-model.exit_logits(s)))
    return torch.stack(out)


def test_gate_exit_depth_is_the_first_iteration_below_the_threshold(gate_model, tokens):
    inputs, targets = tokens
    p = _continue_probs(gate_model, inputs)
    # a threshold in the widest gap near the median value: no value sits close to it
    vals = p.flatten().sort().values
    mid = len(vals) // 2
    lo = max(range(mid - 20, mid + 20), key=lambda i: vals[i + 1] - vals[i])
    threshold = float(vals[lo] + vals[lo + 1]) / 2
    below = p < threshold
    want = torch.where(below.any(0), below.int().argmax(0) + 1, torch.tensor(MAX_R))
    sc = score_tokens(gate_model, inputs, targets, max_r=MAX_R, rule=ExitRule("gate", threshold))
    assert torch.equal(sc.depth, want)
    assert len(set(want.flatten().tolist())) > 2  # the test tells depths apart


def test_gate_limits_in_evaluation_and_generation(gate_model, tokens):
    inputs, targets = tokens
    batches = [(inputs, targets, torch.arange(3))]
    never = evaluate_adaptive(
        gate_model, batches, rule=ExitRule("gate", 0.0), max_r=MAX_R, state_init="zero"
    )
    assert never.mean_depth == MAX_R
    at_once = evaluate_adaptive(
        gate_model, batches, rule=ExitRule("gate", 1e30), max_r=MAX_R, state_init="zero"
    )
    assert at_once.mean_depth == 1.0
    prompt = inputs[0, :5].tolist()
    fixed = generate(gate_model, prompt, GenerationConfig(max_new_tokens=5, r=MAX_R))
    gated = generate(
        gate_model,
        prompt,
        GenerationConfig(max_new_tokens=5, r=MAX_R, exit_rule=ExitRule("gate", 0.0)),
    )
    assert gated.new_ids == fixed.new_ids and gated.depths == fixed.depths
    fast = generate(
        gate_model,
        prompt,
        GenerationConfig(max_new_tokens=5, r=MAX_R, exit_rule=ExitRule("gate", 1e30)),
    )
    assert fast.depths == [MAX_R] + [1] * 4  # the prompt is prefilled at the full r
    curves = exit_curves(
        gate_model, batches, max_r=MAX_R, fixed_curve=[1.0] * MAX_R, state_init="zero"
    )
    assert set(curves) == {"kl", "entropy", "state", "gate"}


def test_gate_criterion_without_a_gate_is_refused(small_eval_model, tokens):
    inputs, targets = tokens
    with pytest.raises(RdptConfigError, match="no exit gate"):
        score_tokens(small_eval_model, inputs, targets, max_r=4, rule=ExitRule("gate", 0.5))
    with pytest.raises(RdptConfigError, match="no exit gate"):
        generate(small_eval_model, [1, 2], GenerationConfig(r=4, exit_rule=ExitRule("gate", 0.5)))
    curves = exit_curves(
        small_eval_model,
        [(inputs, targets, torch.arange(3))],
        max_r=2,
        fixed_curve=[1.0, 1.0],
        state_init="zero",
        thresholds=None,
    )
    assert "gate" not in curves  # the default curves leave out what the model cannot run


def test_weights_without_a_gate_load_into_a_gate_model(gate_model, small_eval_model):
    from pipeline.model.consolidated import full_state_dict, load_full_state_dict
    from pipeline.training.pretrained import Pretrained

    sd = full_state_dict(small_eval_model)
    before = {k: v.clone() for k, v in full_state_dict(gate_model).items()}
    weights = Pretrained(small_eval_model.cfg, sd, None, "consolidated", REPO)
    weights.check_matches(gate_model.cfg)  # adding a gate is allowed
    with pytest.raises(RdptConfigError, match="exit_gate"):  # dropping one is not
        Pretrained(gate_model.cfg, before, None, "consolidated", REPO).check_matches(
            small_eval_model.cfg
        )
    with pytest.raises(Exception, match="missing"):
        load_full_state_dict(gate_model, sd)
    model = build_gate_model()  # the same init as gate_model's
    load_full_state_dict(model, sd, may_miss=("exit_gate.",))
    after = full_state_dict(model)
    for k, v in after.items():
        want = before[k] if k.startswith("exit_gate.") else sd[k]
        assert torch.equal(v, want), k


def test_gate_stage_settings_are_checked(tiny_dataset, tmp_path):
    from pipeline.training.config import load_train_config
    from pipeline.training.resolve import check_exit_gate, resolve

    def cfg(*overrides):
        base = [f"data.path={tiny_dataset}", f"run.dir={tmp_path / 'run'}", "train.stage=exit_gate"]
        return load_train_config(REPO / "configs/train/tiny.yaml", base + list(overrides))

    ok = ["model.exit_gate=true", "model.init_from=runs/x", "recurrence.mode=fixed"]
    cases = [
        (ok[1:], "set model.exit_gate=true"),
        ([ok[0], ok[2]], "set model.init_from"),
        ([*ok[:2], "recurrence.mode=random"], "recurrence.mode=fixed"),
        ([*ok, "recurrence.fixed=1"], "R >= 2"),
        ([*ok, "parallel.zero_stage=3"], "ZeRO-3"),
    ]
    for overrides, message in cases:
        with pytest.raises(RdptConfigError, match=message):
            check_exit_gate(cfg(*overrides))
    check_exit_gate(cfg(*ok))
    with pytest.raises(RdptConfigError, match="set model.init_from"):  # what `rdpt train` runs
        resolve(cfg(ok[0], ok[2]), 1)


def _gate_cmd(init_from, data, run_dir, *extra):
    return rdpt_train_command(
        data,
        run_dir,
        "train.stage=exit_gate",
        "model.exit_gate=true",
        f"model.init_from={init_from}",
        "recurrence.mode=fixed",
        "recurrence.fixed=6",
        "optim.lr=3e-2",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "train.max_steps=8",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "checkpoint.interval=4",
        "checkpoint.keep_last=4",
        "eval.interval=0",
        "tracking.enabled=false",
        "--nproc",
        "1",  # one rank: the stage's code has nothing rank-specific; resume is what is tested
        *extra,
    )


@pytest.mark.slow
def test_gate_stage_trains_only_the_gate_and_resumes_exactly(
    tiny_trained_run, tiny_dataset, tmp_path, capfd
):
    from pipeline.cli import main
    from pipeline.training.checkpoint import checkpoint_config, consolidated_state_dict
    from pipeline.training.pretrained import read_pretrained

    def run(cmd):
        proc = subprocess.run(
            cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(_gate_cmd(tiny_trained_run, tiny_dataset, whole))
    # a second run continues from the first one's step-4 checkpoint to step 8
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints/step-00000004", resumed / "checkpoints/step-00000004")
    (resumed / "checkpoints/latest").write_text("step-00000004\n")
    run(_gate_cmd(tiny_trained_run, tiny_dataset, resumed))
    want, got = step_losses(whole), step_losses(resumed)
    assert sorted(want) == list(range(1, 9)) and sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == want[step], step  # same code, same data, same numbers: bitwise
    assert sum(want[s] for s in (7, 8)) < sum(want[s] for s in (1, 2))  # the gate learns

    base = read_pretrained(tiny_trained_run).state_dict
    ckpts = {}
    for step in (4, 8):
        ckpt = whole / f"checkpoints/step-{step:08d}"
        ckpts[step] = consolidated_state_dict(ckpt, checkpoint_config(ckpt).model)
    for name, value in base.items():  # every parameter of the language model: bitwise
        assert torch.equal(ckpts[8][name], value), name
    gate = sorted(n for n in ckpts[8] if n.startswith("exit_gate."))
    assert gate == ["exit_gate.norm.weight", "exit_gate.proj.bias", "exit_gate.proj.weight"]
    assert not torch.equal(ckpts[4]["exit_gate.proj.weight"], ckpts[8]["exit_gate.proj.weight"])

    # the gate in evaluation: a curve point per threshold beside kl, entropy and state
    out = tmp_path / "eval.json"
    common = ["--recurrences", "1", "--max-sequences", "4", "--max-r", "6", "--no-mlflow"]
    code = main(["eval", str(whole), "--adaptive", "--exit-criterion", "gate",
                 "--threshold", "0.5", "--exit-curve", "--json", str(out), *common])  # fmt: skip
    assert code == 0, capfd.readouterr().err[-3000:]
    res = json.loads(out.read_text())
    assert res["adaptive"]["criterion"] == "gate" and 1 <= res["adaptive"]["mean_depth"] <= 6
    assert [p["threshold"] for p in res["adaptive_curve"]["gate"]] == [0.9, 0.7, 0.5, 0.3, 0.1]
    # and on the run without a gate, a clear refusal before any work
    code = main(["eval", str(tiny_trained_run), "--adaptive", "--exit-criterion", "gate",
                 "--json", str(tmp_path / "no.json"), *common])  # fmt: skip
    assert code != 0 and "no exit gate" in capfd.readouterr().err
