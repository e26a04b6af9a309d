"""`rdpt eval` / `rdpt generate` on the real tiny training run (2-process DeepSpeed ZeRO-2 on real
shards, logged to the real MLflow server): depth curve, adaptive exit, JSON/PNG/MLflow outputs,
multi-process evaluation, lm-eval on a local task, generation, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main


@pytest.fixture(scope="module")
def eval_run(tiny_trained_run, mlflow_server, tmp_path_factory) -> Path:
    """A copy of the trained run whose mlflow_run.json names a fresh MLflow run of its own
    experiment (evaluation writes into the run dir and its MLflow run; the fixture is shared)."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path_factory.mktemp("eval") / "tiny-run"
    shutil.copytree(tiny_trained_run, run_dir, symlinks=True)
    client = MlflowClient(mlflow_server.url)
    exp = f"test-eval-{uuid.uuid4().hex[:8]}"
    run = client.create_run(
        client.create_experiment(exp), run_name="tiny-run", tags={"rdpt.run_dir": str(run_dir)}
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    (run_dir / "mlflow_run.json").write_text(
        json.dumps(
            {
                "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id,
                "experiment": exp,
                "run_name": "tiny-run",
                "tracking_uri": mlflow_server.url,
            }
        )
    )
    (run_dir / "mlflow_delivered.json").unlink(missing_ok=True)
    return run_dir


@pytest.fixture(scope="module")
def val_tokens(tiny_dataset, tmp_path_factory) -> Path:
    """The first 12 validation sequences as a [12, 65] uint16 .npy file."""
    from pipeline.data.loader import iterate_sequences

    inputs, targets, _ = next(iterate_sequences(tiny_dataset, "val", batch_size=12))
    arr = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1).astype(np.uint16)
    path = tmp_path_factory.mktemp("tokens") / "val12.npy"
    np.save(path, arr)
    return path


def test_eval_depth_curve_adaptive_outputs_and_mlflow(eval_run, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.plots import drawn

    out_json = eval_run / "eval-test.json"
    cats = tmp_path / "cats.jsonl"
    rows = [
        {"text": "def main():\n    return 0", "category": "code"},
        {"text": "import os, sys", "category": "code"},
        {"text": "The weather is mild today.", "category": "prose/english"},
    ]
    cats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            "eval",
            str(eval_run),
            "--recurrences",
            "1,8",
            "--state-init",
            "zero",
            "--max-sequences",
            "48",
            "--batch-size",
            "16",
            "--adaptive",
            "--max-r",
            "8",
            "--depth-categories",
            str(cats),
            "--exit-curve",
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "loss against recurrence depth" in printed and "adaptive exit (kl" in printed
    res = json.loads(out_json.read_text())
    d = res["depth"]
    # the trained model uses its depth: one iteration is clearly worse than eight
    assert d["1"]["loss"] > d["8"]["loss"] + 0.02
    assert d["8"]["ppl"] == pytest.approx(math.exp(d["8"]["loss"]))
    assert res["tokens"] == 48 * 64 and res["step"] == 60
    tel = res["telemetry"]
    assert len(tel["rel_change"]) == len(tel["state_cosine"]) == len(tel["loss"]) == 8
    assert tel["rel_change"][-1] < tel["rel_change"][0]
    assert tel["loss"][7] == pytest.approx(d["8"]["loss"], rel=1e-9)
    ad = res["adaptive"]
    assert sum(ad["histogram"].values()) == ad["tokens"] == res["tokens"]
    assert 1 <= ad["mean_depth"] <= 8
    assert ad["equal_loss_r"] is None or ad["fixed_loss"][ad["equal_loss_r"] - 1] <= ad["loss"] * (
        1 + 1e-6
    )
    curve = res["adaptive_curve"]
    assert set(curve) == {"kl", "entropy", "state"}
    assert all(len(points) == 5 for points in curve.values())
    (panel,) = drawn(eval_run / "eval" / "loss_vs_mean_depth.png")
    assert {ln["label"] for ln in panel["lines"]} == {"fixed r", "kl", "entropy", "state"}
    assert "loss against mean depth" in printed
    by_cat = res["adaptive_by_category"]["categories"]
    assert set(by_cat) == {"code", "prose/english"}
    for category, per in by_cat.items():
        png = eval_run / "eval" / f"exit_depth_{category.replace('/', '_')}.png"
        (panel,) = drawn(png)
        bars = panel["bars"]
        for k, cond in enumerate(("plain", "cot")):
            depths = per[cond]["depths"]
            assert per[cond]["tokens"] == len(depths) > 0
            # the plotted bars are the per-token exit depths counted, depth 1..max_r
            assert bars[8 * k : 8 * (k + 1)] == [float(depths.count(d)) for d in range(1, 9)]
            assert f"mean depth {sum(depths) / len(depths):.2f}" in panel["legend"][k]
    pngs = {Path(p).name for p in res["plots"]}
    assert pngs == {
        "loss_vs_r.png",
        "exit_histogram.png",
        "loss_vs_mean_depth.png",
        "exit_depth_code.png",
        "exit_depth_prose_english.png",
        "state_convergence.png",
        "loss_vs_tokens.png",
    }
    for p in res["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((eval_run / "mlflow_run.json").read_text())
    assert res["mlflow_run_id"] == saved["run_id"]
    client = MlflowClient(saved["tracking_uri"])
    hist = client.get_metric_history(saved["run_id"], "eval/loss_r")
    assert {m.step: m.value for m in hist} == pytest.approx({1: d["1"]["loss"], 8: d["8"]["loss"]})
    assert {m.step for m in client.get_metric_history(saved["run_id"], "eval/ppl_r")} == {1, 8}
    assert client.get_metric_history(saved["run_id"], "eval/adaptive_mean_depth")[
        0
    ].value == pytest.approx(ad["mean_depth"])
    arts = {a.path for a in client.list_artifacts(saved["run_id"], "eval")}
    assert {f"eval/{n}" for n in pngs} | {"eval/eval-test.json"} <= arts
    assert client.get_run(saved["run_id"]).info.status == "FINISHED"


def test_eval_tokens_two_processes_equal_one(eval_run, val_tokens, tmp_path):
    common = [
        "eval",
        str(eval_run),
        "--tokens",
        str(val_tokens),
        "--recurrences",
        "1,3",
        "--state-init",
        "random",
        "--seed",
        "7",
        "--batch-size",
        "4",
        "--no-mlflow",
        "--no-telemetry",
        "--out-dir",
        str(tmp_path / "plots"),
    ]
    env_before = dict(os.environ)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
        assert main([*common, "--nproc", "2", "--json", str(tmp_path / "two.json")]) == 0
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["tokens"] == two["tokens"] == 12 * 64
    for r in ("1", "3"):
        assert two["depth"][r]["loss"] == pytest.approx(one["depth"][r]["loss"], rel=1e-6)
    assert one["source"] == {"tokens": str(val_tokens.resolve())}


def test_eval_by_mlflow_run_id_and_new_eval_run_for_bare_checkpoint(
    eval_run, val_tokens, mlflow_server, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((eval_run / "mlflow_run.json").read_text())["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    common = [
        "--tokens",
        str(val_tokens),
        "--recurrences",
        "2",
        "--no-telemetry",
        "--out-dir",
        str(tmp_path / "plots"),
    ]
    assert main(["eval", run_id, *common, "--no-mlflow", "--json", str(tmp_path / "a.json")]) == 0
    res = json.loads((tmp_path / "a.json").read_text())
    assert Path(res["run_dir"]) == eval_run.resolve() and res["step"] == 60
    # a checkpoint copied out of its run directory: a new MLflow run linked by a tag
    bare = tmp_path / "exported" / "step-00000030"
    shutil.copytree(eval_run / "checkpoints" / "step-00000030", bare)
    assert main(["eval", str(bare), *common, "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["mlflow_run_id"] and res["mlflow_run_id"] != run_id and res["step"] == 30
    run = MlflowClient(mlflow_server.url).get_run(res["mlflow_run_id"])
    assert run.data.tags["rdpt.eval_of"] == str(bare.resolve())
    assert run.data.metrics["eval/loss_r"] == pytest.approx(res["depth"]["2"]["loss"])


MC_DOCS = [
    {
        "question": "import json\n\ndef load(path):\n    with open(path) as f:\n        return",
        "choices": [" json.load(f)", " 12 + class"],
        "answer": 0,
    },
    {
        "question": "for key, value in",
        "choices": [" items.items():", " return return"],
        "answer": 0,
    },
    {"question": "class Message", "choices": ["(object):", " = = ("], "answer": 0},
    {"question": "    def __init__(self", "choices": [", name):", " import"], "answer": 0},
]
ROLLING_DOCS = [
    {"text": "def get(self, key, default=None):\n    return self._data.get(key)\n"},
    {"text": "import os\nimport sys\n\nprint(sys.argv)\n"},
]


def _write_tasks(folder: Path) -> Path:
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "roll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ROLLING_DOCS))
    (folder / "rdpt_mc.yaml").write_text(f"""\
task: rdpt_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {folder / "mc.jsonl"}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "rdpt_roll.yaml").write_text(f"""\
task: rdpt_test_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "roll.jsonl"}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return folder


def test_lm_eval_local_task_score_changes_with_checkpoint(eval_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    tasks = _write_tasks(tmp_path / "tasks")
    scores = {}
    for step in ("00000030", "00000060"):
        out = tmp_path / f"lm-{step}.json"
        rc = main(
            [
                "eval",
                str(eval_run / "checkpoints" / f"step-{step}"),
                "--recurrences",
                "4",
                "--state-init",
                "zero",
                "--max-sequences",
                "4",
                "--no-telemetry",
                "--no-mlflow",
                "--lm-eval-tasks",
                "rdpt_test_mc,rdpt_test_rolling",
                "--lm-eval-include",
                str(tasks),
                "--json",
                str(out),
                "--out-dir",
                str(tmp_path / f"plots-{step}"),
            ]
        )
        assert rc == 0
        lm = json.loads(out.read_text())["lm_eval"]
        assert lm["r"] == 4 and lm["mean_depth"] == 4
        ckpt = eval_run / "checkpoints" / f"step-{step}"
        assert lm["tasks"]["rdpt_test_mc"]["acc,none"] == _expected_mc_accuracy(ckpt)
        scores[step] = lm["tasks"]["rdpt_test_rolling"]
        assert math.isfinite(scores[step]["word_perplexity,none"])
    # more training on this kind of text: a better model
    assert scores["00000060"]["bits_per_byte,none"] < scores["00000030"]["bits_per_byte,none"]


def _expected_mc_accuracy(ckpt: Path) -> float:
    """The multiple-choice accuracy computed here, independently of lm-eval and the adapter: a
    plain forward of each question + " " + choice (r = 4, zero state), the summed log
    probabilities of the choice's tokens, the best choice against the answer."""
    import torch

    from pipeline.eval.loading import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(str(ckpt))
    model, tok = loaded.model, loaded.tokenizer

    def encode(text):
        return tok.encode(text, add_special_tokens=False).ids

    right = 0
    for doc in MC_DOCS:
        scores = []
        for choice in doc["choices"]:
            ctx, whole = encode(doc["question"]), encode(doc["question"] + " " + choice)
            cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else encode(" " + choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logits = model(ids[:, :-1], r=4, state_init="zero").logits_BSV[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
            scores.append(sum(float(logp[p, ids[0, p + 1]]) for p in positions))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(MC_DOCS)


def test_generate_cli_fixed_and_adaptive(eval_run, tmp_path, capsys, c_compiler):
    out = tmp_path / "gen.json"
    assert (
        main(
            [
                "generate",
                str(eval_run),
                "--prompt",
                "def load(self",
                "--max-new-tokens",
                "12",
                "--recurrences",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    printed = capsys.readouterr()
    assert printed.out.startswith("def load(self")
    assert "tokens/s" in printed.err
    assert 1 <= res["new_tokens"] <= 12 and res["tokens_per_s"] > 0
    assert res["depths"] == [4] * res["new_tokens"]
    out2 = tmp_path / "gen-adaptive.json"
    assert (
        main(
            [
                "generate",
                str(eval_run),
                "--prompt",
                "import os\n",
                "--max-new-tokens",
                "12",
                "--adaptive",
                "--threshold",
                "1e-2",
                "--max-r",
                "16",
                "--kv-budget",
                "4",
                "--continuous-cot",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
                "--seed",
                "1",
                "--json",
                str(out2),
            ]
        )
        == 0
    )
    res2 = json.loads(out2.read_text())
    assert res2["depths"][0] == 16  # the prompt is prefilled at the full depth
    assert all(1 <= d <= 16 for d in res2["depths"])
    assert res2["config"]["kv_budget"] == 4 and res2["config"]["adaptive"]
    assert res2["decode_path"] == "native-kernels"  # a tiny fp32 model on CPU
    out3 = tmp_path / "gen-speculative.json"
    argv = ["generate", str(eval_run), "--prompt", "def load(self", "--max-new-tokens", "12"]
    assert main([*argv, "--recurrences", "4", "--speculate", "2:3", "--json", str(out3)]) == 0
    res3 = json.loads(out3.read_text())
    spec = res3["speculation"]
    assert res3["new_ids"] == res["new_ids"]  # the fixed-r greedy run above
    assert spec["identical_to_plain"] and spec["draft_r"] == 2 and spec["n"] == 3
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["speedup"] > 0
    assert "acceptance" in capsys.readouterr().err
    for bad, message in (("4:2", "DRAFT_R must be in 1..r-1 = 1..3"), ("2:0", "must be >= 1")):
        assert main([*argv, "--recurrences", "4", "--speculate", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_bad_input_gives_clear_errors(eval_run, mlflow_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cases = [
        (["eval", "0123456789abcdef0123456789abcdef"], "nor a run id known to the MLflow server"),
        (["eval", str(tmp_path / "nowhere")], "no checkpoint or run directory"),
        (["eval", str(eval_run), "--recurrences", "1,0,4"], "r must be >= 1, got 0"),
        (["eval", str(eval_run), "--recurrences", "-2"], "r must be >= 1, got -2"),
        (["eval", str(eval_run), "--tokens", str(tmp_path / "missing.npy")], "no such file"),
        (
            ["generate", str(tmp_path / "nowhere"), "--prompt", "x"],
            "no checkpoint or run directory",
        ),
    ]
    empty_run = tmp_path / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    cases.append((["eval", str(empty_run), "--no-mlflow"], "no complete, uncorrupted checkpoint"))
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert message in err, (argv, err)
        assert "Traceback" not in err
