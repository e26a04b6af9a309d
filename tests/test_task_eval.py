"""`rdpt eval --task`: exact-match accuracy per method, knob and difficulty, checked on a
hand-built answer set; the command writes JSON, table, PNGs and MLflow metrics for a real
model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_model_reference import tp1  # noqa: F401  (fixture)

from data_prep.task_prep import TaskPrepConfig, prepare_task
from pipeline.data.task_loader import TaskExample
from pipeline.eval.task_eval import Prediction, TaskEvalPlan, answer_ids, score

MARK, EOT = 50, 0
IDS = {"=>": MARK, "<|endoftext|>": EOT}


def _example(difficulty: int, answer: int, sid: int) -> TaskExample:
    tokens = [30, 31, 32] + [40] * difficulty + [MARK, answer, EOT]
    segments = [0, 0, 0] + list(range(1, difficulty + 1)) + [-1, -1, -1]
    return TaskExample(
        np.array(tokens), np.array(segments), np.array([s != 0 for s in segments]), difficulty, sid
    )


def test_answer_is_what_follows_the_last_answer_mark():
    assert answer_ids([40, MARK, 7, EOT, 9], MARK, EOT) == (7,)
    assert answer_ids([MARK, 3, 41, MARK, 7, 8], MARK, EOT) == (7, 8)  # no <eot>: to the end
    assert answer_ids([40, 7, EOT], MARK, EOT) is None
    assert answer_ids([MARK, EOT], MARK, EOT) == ()


def test_accuracy_per_method_knob_and_difficulty_on_a_hand_built_answer_set():
    # 4 examples of each difficulty 1..4; answers are the sample ids
    examples = [_example(d, 100 + 10 * d + i, 10 * d + i) for d in (1, 2, 3, 4) for i in range(4)]

    # The hand-built "model": depth r solves difficulty <= r; p pauses solve difficulty <= p
    # for the first two examples of a level only; thoughts never write `=>`.
    def predict(question, method, knob):
        ex = next(answers)
        ok = {
            "depth": ex.difficulty <= knob,
            "pause": ex.difficulty <= knob and ex.sample_id % 10 < 2,
            "thought": False,
        }[method]
        if method == "thought":
            return Prediction([40, 41, EOT], 6, 2.0)
        answer = int(ex.tokens[-2]) if ok else int(ex.tokens[-2]) + 1
        return Prediction([40] * ex.difficulty + [MARK, answer, EOT], 10, float(knob))

    plan = TaskEvalPlan(recurrences=[1, 2, 4], pauses=[0, 3], thoughts=[2], r=4)
    answers = iter([ex for _ in plan.points() for ex in examples])  # score's order
    res = score(examples, predict, plan, IDS, lambda positions, iters: positions * iters)
    depth = {p["knob"]: p for p in res["methods"]["depth"]}
    assert depth[1]["by_difficulty"] == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0}
    assert depth[2]["accuracy"] == 0.5 and depth[4]["accuracy"] == 1.0
    pause = {p["knob"]: p for p in res["methods"]["pause"]}
    assert pause[0]["accuracy"] == 0.0
    assert pause[3]["by_difficulty"] == {"1": 0.5, "2": 0.5, "3": 0.5, "4": 0.0}
    assert pause[3]["accuracy"] == 6 / 16 and pause[3]["r"] == 4
    assert res["methods"]["thought"][0]["accuracy"] == 0.0
    assert (
        depth[2]["flops_per_answer"] == 20.0
        and res["methods"]["thought"][0]["flops_per_answer"] == 12.0
    )
    assert all(p["examples"] == 16 for pts in res["methods"].values() for p in pts)


@pytest.fixture(scope="module")
def export_and_data(tmp_path_factory):
    """A real tiny model (random weights) exported with the task's tokenizer, and the task."""
    import torch

    from pipeline.common.config_io import load_config
    from pipeline.model import ModelConfig, build_model
    from pipeline.model.consolidated import full_state_dict, write_consolidated
    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    root = tmp_path_factory.mktemp("taskeval")
    data = root / "arith"
    prepare_task(
        TaskPrepConfig(
            task="arithmetic",
            output=str(data),
            sizes={"train": 16, "val": 4, "test": 12},
            arithmetic={"steps": [1, 3]},
        )
    )
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    init_model_parallel(tp=1)
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, "configs/model/tiny.yaml", [f"vocab_size={vocab}"])
    model = build_model(cfg)
    out = write_consolidated(
        full_state_dict(model),
        cfg,
        root / "export",
        {"mean_recurrence": 2, "mean_backprop_depth": 1},
        {"tokenizer.json": data / "tokenizer.json"},
    )
    destroy_model_parallel()
    return out, data


def test_rdpt_eval_task_writes_json_table_plots_and_mlflow(
    export_and_data, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    export, data = export_and_data
    out_json = tmp_path / "task.json"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "eval",
        str(export),
        "--task",
        "--data",
        str(data),
        "--recurrences",
        "1,2",
        "--pause",
        "0,2",
        "--thoughts",
        "1",
        "--task-r",
        "2",
        "--adaptive",
        "--max-r",
        "3",
        "--max-new-tokens",
        "8",
        "--json",
        str(out_json),
        "--out-dir",
        str(tmp_path / "plots"),
        "--tracking-uri",
        mlflow_server.url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact-match accuracy" in proc.stdout and "pause" in proc.stdout
    res = json.loads(out_json.read_text())
    assert res["split"] == "test" and res["task"] == "arithmetic"
    knobs = {m: [p["knob"] for p in pts] for m, pts in res["methods"].items()}
    assert knobs == {"depth": [1, 2], "pause": [0, 2], "thought": [1], "adaptive": [3]}
    for pts in res["methods"].values():
        for p in pts:
            assert p["examples"] == 12 and 0.0 <= p["accuracy"] <= 1.0
            assert set(p["by_difficulty"]) <= {"1", "2", "3"} and p["flops_per_answer"] > 0
    # more depth costs more compute per answer; pauses too
    assert (
        res["methods"]["depth"][1]["flops_per_answer"]
        > res["methods"]["depth"][0]["flops_per_answer"]
    )
    assert (
        res["methods"]["pause"][1]["flops_per_answer"]
        > res["methods"]["pause"][0]["flops_per_answer"]
    )
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "task_accuracy_by_difficulty.png",
        "task_accuracy_vs_flops.png",
    ]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    history = client.get_metric_history(res["mlflow_run_id"], "task/depth/accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    arts = [a.path for a in client.list_artifacts(res["mlflow_run_id"], "eval")]
    assert "eval/task_accuracy_vs_flops.png" in arts


def test_bad_task_eval_arguments_are_clear_errors(export_and_data, tiny_dataset):
    export, data = export_and_data
    base = [sys.executable, "-m", "pipeline", "eval", str(export), "--no-mlflow"]
    for extra, words in [
        (["--task", "--data", str(data), "--pause", "0,-2"], "--pause: every count"),
        (["--task", "--data", str(tiny_dataset)], "not a task dataset"),
        (["--data", str(data), "--thoughts", "2"], "--thoughts applies to --task only"),
    ]:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]


def test_runs_compare_draws_the_task_curves_of_several_runs(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.plots import drawn
    from pipeline.tracking.runs import compare_runs

    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.create_experiment(f"task-compare-{tmp_path.name}")
    logged = {
        "a": {"depth": {1: (0.2, 1e6), 4: (0.5, 4e6)}},
        "b": {"depth": {1: (0.1, 1e6)}, "pause": {0: (0.1, 1e6), 8: (0.3, 2e6)}},
    }
    ids = []
    for name, methods in logged.items():
        run = client.create_run(exp, run_name=name)
        for method, pts in methods.items():  # as rdpt eval --task logs them: step = knob
            for knob, (acc, flops) in pts.items():
                client.log_metric(run.info.run_id, f"task/{method}/accuracy", acc, step=knob)
                client.log_metric(
                    run.info.run_id, f"task/{method}/flops_per_answer", flops, step=knob
                )
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    res = compare_runs(ids, tracking_uri=mlflow_server.url, out_dir=tmp_path, log_to_runs=False)
    png = tmp_path / "task_accuracy.png"
    assert str(png) in res["plots"]
    lines = {ln["label"]: (ln["x"], ln["y"]) for ln in drawn(png)[0]["lines"]}
    assert lines == {
        "a depth": ([1e6, 4e6], [0.2, 0.5]),
        "b depth": ([1e6], [0.1]),
        "b pause": ([1e6, 2e6], [0.1, 0.3]),
    }
    assert res["metrics"]["task_depth_best_accuracy"] == [0.5, 0.1]
    assert res["metrics"]["task_pause_best_accuracy"] == [None, 0.3]
