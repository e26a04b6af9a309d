"""Every YAML file under configs/ loads into its schema, and every training config resolves and
dry-runs (`rdpt train CONFIG --dry-run`) on a real prepared dataset: a config that no longer
matches the code fails here, not in a user's job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as rdpt

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))


def schema_for(path: Path):
    from data_prep.config import PrepConfig
    from data_prep.task_prep import TaskPrepConfig
    from launch.site import SiteConfig
    from pipeline.model.config import ModelConfig
    from pipeline.training.config import TrainConfig

    if path.parts[1] == "data" and "task" in yaml.safe_load((REPO / path).read_text()):
        return TaskPrepConfig  # a reasoning task suite (rdpt prep --task)
    return {"data": PrepConfig, "model": ModelConfig, "train": TrainConfig, "site": SiteConfig}[
        path.parts[1]
    ]


def test_configs_folder_has_every_kind():
    kinds = {p.parts[1] for p in CONFIGS}
    assert kinds == {"data", "model", "train", "site"}, kinds


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_loads_into_its_schema(path):
    from pipeline.common.config_io import load_config

    cfg = load_config(schema_for(path), REPO / path)
    raw = yaml.safe_load((REPO / path).read_text())
    for key in raw:  # what the file sets is what the schema holds (no silent drops)
        assert key in type(cfg).model_fields, (path, key)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parts[1] == "train"], ids=str)
def test_train_config_dry_runs(path, tiny_dataset, tmp_path_factory, tmp_path, capsys):
    stage = yaml.safe_load((REPO / path).read_text()).get("train", {}).get("stage", "pretrain")
    if stage in ("task", "coconut"):  # fine-tuning stages read a task dataset
        from data_prep.task_prep import TaskPrepConfig, prepare_task

        tiny_dataset = tmp_path_factory.mktemp("task") / "arith"
        prepare_task(
            TaskPrepConfig(
                task="arithmetic", output=str(tiny_dataset),
                sizes={"train": 64, "val": 8, "test": 8},
            )
        )  # fmt: skip
    code = rdpt(
        ["train", str(REPO / path), f"data.path={tiny_dataset}", f"run.dir={tmp_path}", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    resolved_yaml, _, ds_json = out.partition("# DeepSpeed config")
    resolved = yaml.safe_load(resolved_yaml)
    ds = json.loads(ds_json)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert resolved["model"]["vocab_size"] >= manifest["vocab_size"]
    assert resolved["data"]["path"] == str(tiny_dataset.resolve())
    assert ds["train_batch_size"] == resolved["train"]["global_batch_size"]
    assert ds["zero_optimization"]["stage"] == resolved["parallel"]["zero_stage"]
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"
