"""The reasoning task suite (`rdpt prep --task`): deterministic, disjoint splits, the fields
training reads, and clear errors for settings that measure no reasoning."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.reasoning_tasks import ANSWER_MARK, make_task
from data_prep.shards import ShardReader
from data_prep.task_prep import ANSWER, PAD_SEGMENT, QUESTION, TaskPrepConfig, prepare_task
from data_prep.verify import verify_dataset
from pipeline.common.errors import RdptConfigError

SIZES = {"train": 200, "val": 30, "test": 40}


def _prep(tmp_path, task, name="d", **kw):
    cfg = TaskPrepConfig(
        task=task,
        output=str(tmp_path / name),
        sizes=SIZES,
        seqs_per_member=16,
        rows_per_shard=64,
        **kw,
    )
    return prepare_task(cfg), tmp_path / name


def _fields(root, manifest, split):
    """Every field of every row of `split`, read back through wids (as training does)."""
    from wids.wids import IndexedTarSamples

    out = {k: [] for k in ("npy", "mask.npy", "steps.npy", "difficulty.npy")}
    for shard in manifest["splits"][split]["shards"]:
        tar = IndexedTarSamples(path=str(root / shard["path"]))
        for m in range(len(tar)):
            sample = tar[m]
            for k in out:
                out[k].append(np.load(sample["." + k]))
        tar.close()
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("task", ["arithmetic", "reachability"])
def test_same_seed_same_bytes_other_seed_other_examples(tmp_path, task):
    m1, d1 = _prep(tmp_path, task, "a")
    m2, d2 = _prep(tmp_path, task, "b")
    m3, d3 = _prep(tmp_path, task, "c", seed=1)
    for split in SIZES:
        for s1, s2 in zip(m1["splits"][split]["shards"], m2["splits"][split]["shards"]):
            assert s1["sha256"] == s2["sha256"]
    assert (d1 / "tokenizer.json").read_bytes() == (d2 / "tokenizer.json").read_bytes()
    a = _fields(d1, m1, "train")["npy"]
    c = _fields(d3, m3, "train")["npy"]
    assert a.shape[0] == c.shape[0] == SIZES["train"]
    assert not np.array_equal(
        a[:, : min(a.shape[1], c.shape[1])], c[:, : min(a.shape[1], c.shape[1])]
    )


@pytest.mark.parametrize("task", ["arithmetic", "reachability"])
def test_splits_are_disjoint_and_hold_the_asked_sizes(tmp_path, task):
    manifest, root = _prep(tmp_path, task)
    verify_dataset(root, quiet=True)
    questions = {}
    for split in SIZES:
        f = _fields(root, manifest, split)
        assert len(f["npy"]) == SIZES[split] == manifest["splits"][split]["sequences"]
        qs = {tuple(row[seg == QUESTION]) for row, seg in zip(f["npy"], f["steps.npy"])}
        assert len(qs) == SIZES[split]  # distinct instances inside a split
        questions[split] = qs
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]


def test_fields_mask_steps_and_difficulty_agree_with_the_text(tmp_path):
    manifest, root = _prep(tmp_path, "arithmetic", arithmetic={"steps": [1, 5]})
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    f = _fields(root, manifest, "train")
    ids = manifest["special_ids"]
    counts = {}
    for row, mask, seg, diff in zip(f["npy"], f["mask.npy"], f["steps.npy"], f["difficulty.npy"]):
        # loss on steps and answer, nothing on the question or the padding
        assert np.array_equal(mask.astype(bool), (seg > 0) | (seg == ANSWER))
        assert set(np.unique(seg[seg > 0])) == set(range(1, diff + 1))  # one segment per step
        assert np.all(row[seg == PAD_SEGMENT] == manifest["pad_id"])
        answer = row[seg == ANSWER]
        assert answer[0] == ids[ANSWER_MARK] and answer[-1] == manifest["eot_id"]
        # the step segments follow each other: boundaries are where the segment changes
        order = seg[seg != PAD_SEGMENT]
        assert np.all(np.diff(np.where(order == ANSWER, 10**4, order)) >= 0)
        # the last step's result is the answer: "x = v op k = RESULT ;"
        last = tok.decode(row[seg == diff].tolist()).split()
        assert last[-2] == tok.decode(answer[1:-1].tolist())
        counts[int(diff)] = counts.get(int(diff), 0) + 1
    assert {int(k): v for k, v in manifest["splits"]["train"]["difficulty"].items()} == counts
    assert set(counts) == {1, 2, 3, 4, 5}


def test_arithmetic_answers_are_the_chain_value():
    task = make_task("arithmetic", {"steps": [3, 3], "modulus": 7})
    rng = random.Random(5)
    for _ in range(50):
        ex = task.sample(rng)
        env = {}
        bindings = [b.split() for b in ex.question.split("?")[0].split(";")]
        while len(env) < len(bindings):  # evaluate in dependency order
            for b in bindings:
                if len(b) == 3:
                    env[b[0]] = int(b[2])
                elif b[2] in env:
                    op = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[b[3]]
                    env[b[0]] = op(env[b[2]], int(b[4])) % 7
        assert str(env[ex.question.split("?")[1].strip()]) == ex.answer
        assert len(ex.steps) == ex.difficulty == 3


def test_reachability_answer_is_reachable_and_the_other_is_not():
    task = make_task("reachability", {"hops": [2, 4], "nodes": 32})
    rng = random.Random(3)
    for _ in range(50):
        ex = task.sample(rng)
        facts, query = ex.question.split("?")
        edges = [tuple(f.split(" -> ")) for f in facts.split(" ; ")]
        edges = [(a.strip(), b.strip()) for a, b in edges]
        src, rest = query.strip().split(" -> ")
        cands = rest.split(" or ")
        seen, todo = {src}, [src]
        while todo:
            x = todo.pop()
            for a, b in edges:
                if a == x and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert ex.answer in seen and ex.answer in cands
        assert [c for c in cands if c != ex.answer][0] not in seen
        assert len(ex.steps) == ex.difficulty
        assert ex.steps[0].startswith(src + " ->") and ex.steps[-1].endswith("-> " + ex.answer)


@pytest.mark.parametrize(
    "task, settings, words",
    [
        ("arithmetic", {"steps": [0, 3]}, "without reasoning steps"),
        ("reachability", {"hops": [0, 2]}, "without reasoning steps"),
        ("arithmetic", {"steps": [4, 2]}, "empty"),
        ("arithmetic", {"steps": [1, 30]}, "variables"),
        ("reachability", {"hops": [2, 40], "nodes": 16}, "distinct nodes"),
        ("sorting", {}, "unknown task"),
    ],
)
def test_bad_settings_are_clear_errors(task, settings, words):
    with pytest.raises(RdptConfigError, match=words):
        make_task(task, settings)


def test_too_few_instances_for_the_sizes_is_a_clear_error(tmp_path):
    with pytest.raises(RdptConfigError, match="distinct examples"):
        prepare_task(
            TaskPrepConfig(
                task="arithmetic",
                output=str(tmp_path / "x"),
                sizes={"train": 5000, "val": 10, "test": 10},
                arithmetic={"steps": [1, 1], "modulus": 2, "variables": 2, "ops": ["+"]},
            )
        )


def test_rdpt_prep_task_cli_writes_a_verified_dataset_and_refuses_no_steps(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "prep",
        "--task",
        "reachability",
        "--output",
        str(out),
        "sizes.train=40",
        "sizes.val=5",
        "sizes.test=5",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "task" and manifest["task"]["name"] == "reachability"
    verify_dataset(out, quiet=True)
    reader = ShardReader(
        out / manifest["splits"]["val"]["shards"][0]["path"],
        5,
        manifest["seq_len"],
        "uint16",
        manifest["seqs_per_member"],
        "tarfile",
    )
    assert reader.member(0).shape == (5, manifest["seq_len"] + 1)  # plain readers see the rows
    bad = subprocess.run(
        cmd[:-3] + ["--overwrite", "reachability.hops=[0,3]"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "without reasoning steps" in bad.stderr
