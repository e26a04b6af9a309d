"""Faults while checkpointing, through the real commands: a rank SIGKILLed at every phase of a
2-rank save, a bit flipped in a checkpoint file, a tampered (code-carrying) pickle, a full disk.
After each, `--resume auto` continues from the last good state and reaches exactly the losses
of an uninterrupted run (or recomputes exactly the steps an unbroken process had computed);
nothing ever runs code from a checkpoint; no partial file sits under a final name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_data import small_filesystem
from fixtures_training import REPO, step_losses, training_env

TINY = str(REPO / "configs/train/tiny.yaml")


def _cmd(data, run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        TINY,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "train.max_steps=8",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "checkpoint.interval=2",
        "checkpoint.keep_last=4",
        "eval.interval=0",
        "tracking.enabled=false",
        "--nproc",
        "2",
        *extra,
    ]


def _run(cmd, **kw):
    return subprocess.run(
        cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=900, **kw
    )


def _losses_per_process(run_dir: Path) -> list[dict[int, float]]:
    """train/loss by step for each process that wrote to metrics.jsonl, in order (the journal
    is appended to, flushed line by line; a process starts where the step does not grow)."""
    out: list[dict[int, float]] = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" not in rec:
            continue
        if not out or rec["step"] <= max(out[-1]):
            out.append({})
        out[-1][rec["step"]] = rec["train/loss"]
    return out


@pytest.mark.slow
def test_sigkill_at_every_phase_of_a_two_rank_save_then_resume_is_exact(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # 1. rank 1 dies inside DeepSpeed's save of step 2: no checkpoint at all
    killed = _run(_cmd(tiny_dataset, run, 'debug.kill_in_checkpoint=["2:engine:1"]'))
    assert killed.returncode != 0
    assert not (ckpts / "step-00000002").exists() and not (ckpts / "latest").exists()
    # 2. (from scratch) rank 0 dies with every file of step 4 written, nothing hashed: step 2
    # stays the latest
    killed = _run(_cmd(tiny_dataset, run, 'debug.kill_in_checkpoint=["4:files:0"]'))
    assert killed.returncode != 0
    assert (ckpts / ".tmp-step-00000004").is_dir() and not (ckpts / "step-00000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    # 3. (from step 2) rank 0 dies between the rename of step 6 and the move of `latest`
    killed = _run(_cmd(tiny_dataset, run, 'debug.kill_in_checkpoint=["6:renamed:0"]'))
    assert killed.returncode != 0
    assert (ckpts / "step-00000006" / "files.sha256.json").is_file()
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    # 4. (from step 4) an ordinary resume finishes the run
    done = _run(_cmd(tiny_dataset, run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "COMPLETED").is_file()
    # Every resumed process recomputes steps its predecessor had computed without a break:
    # they must agree exactly (that is what an uninterrupted run would have logged).
    first, scratch, from2, from4 = _losses_per_process(run)
    assert sorted(first) == [1, 2] and sorted(scratch) == [1, 2, 3, 4]
    assert sorted(from2) == [3, 4, 5, 6] and sorted(from4) == [5, 6, 7, 8]
    for earlier, later in ((first, scratch), (scratch, from2), (from2, from4)):
        for step in sorted(set(earlier) & set(later)):
            assert later[step] == pytest.approx(earlier[step], abs=1e-6), step
    assert sorted(step_losses(run)) == list(range(1, 9))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_bit_flipped_checkpoint_is_skipped_by_train_and_eval(tiny_trained_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(tiny_trained_run, run)
    (run / "COMPLETED").unlink()
    victim = next((run / "checkpoints/step-00000060/ds").glob("*optim_states.pt"))
    _flip_a_byte(victim)
    from pipeline.cli import main

    code = main(
        [
            "eval",
            str(run),
            "--recurrences",
            "1",
            "--max-sequences",
            "4",
            "--no-telemetry",
            "--no-mlflow",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    out = capfd.readouterr()
    assert code == 0, out.err[-3000:]
    assert f"{victim} is corrupted" in out.out + out.err  # named, then skipped
    assert json.loads((tmp_path / "e.json").read_text())["step"] == 30
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            str(run / "resolved.yaml"),
            f"run.dir={run}",
            "train.max_steps=31",
            "tracking.enabled=false",
            "--nproc",
            "2",
        ],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "logs/train.log").read_text()
    assert f"{victim} is corrupted" in log and "step-00000030 (step 30)" in log
    assert (run / "checkpoints/step-00000031").is_dir()


class _Payload:
    """Unpickling this runs code (creates a file): what a tampered checkpoint would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def tampered_checks(data: str, root: str) -> dict:
    """In one process (imports once): per ZeRO stage, train one step, plant a code-carrying
    object in a DeepSpeed file (hashes forged), then run `rdpt train --resume`, `rdpt eval`
    and `rdpt export` on it. Returns {stage: {command: (exit code, refused, code ran)}}."""
    import contextlib
    import io

    import torch

    from pipeline.cli import main
    from pipeline.common.atomic import atomic_write_json, sha256_file
    from pipeline.training.checkpoint import FILES_LIST

    results = {}
    for zero in (1, 2, 3):
        tmp = Path(root) / f"zero{zero}"
        run, marker = tmp / "run", tmp / "code-ran"
        base = [
            TINY,
            f"data.path={data}",
            f"run.dir={run}",
            "train.global_batch_size=4",
            f"parallel.zero_stage={zero}",
            "eval.interval=0",
            "tracking.enabled=false",
            "checkpoint.interval=1",
            "--nproc",
            "1",
        ]
        assert main(["train", *base, "train.max_steps=1"]) == 0
        ckpt = run / "checkpoints/step-00000001"
        target = next((ckpt / "ds").glob("*model_states.pt"))
        blob = torch.load(target, weights_only=False)  # this process's own, fresh file
        blob["evil"] = _Payload(str(marker))
        torch.save(blob, target)
        hashes = json.loads((ckpt / FILES_LIST).read_text())
        hashes[str(target.relative_to(ckpt))] = {
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
        }
        atomic_write_json(ckpt / FILES_LIST, hashes)
        commands = {
            "train --resume": ["train", *base, "train.max_steps=2"],
            "eval": [
                "eval",
                str(run),
                "--recurrences",
                "1",
                "--max-sequences",
                "2",
                "--no-mlflow",
                "--no-telemetry",
            ],
            "export": ["export", str(run), str(tmp / "export")],
        }
        results[zero] = {}
        for name, args in commands.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(args)
            refused = "refusing to load" in err.getvalue()
            results[zero][name] = (code, refused, marker.exists())
        results[zero]["export written"] = (tmp / "export").exists()
    return results


@pytest.mark.slow
def test_tampered_checkpoint_is_refused_by_train_eval_and_export(tiny_dataset, tmp_path):
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_train_faults as t;"
        f"print(json.dumps(t.tampered_checks({str(tiny_dataset)!r}, {str(tmp_path)!r})))"
    )
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for zero in ("1", "2", "3"):
        for name in ("train --resume", "eval", "export"):
            exit_code, refused, ran = results[zero][name]
            assert exit_code == 2 and refused, (zero, name, results[zero])
            assert not ran, f"ZeRO-{zero}: {name} ran code from the checkpoint"
        assert not results[zero]["export written"]


@pytest.mark.slow
def test_disk_full_while_checkpointing_stops_every_rank_and_keeps_the_last_good_one(
    tiny_dataset, tmp_path
):
    from pipeline.training.checkpoint import CheckpointManager, verify_checkpoint

    run = tmp_path / "run"
    # room for one checkpoint of the tiny model (18 MB with its optimizer state), not two
    with small_filesystem(run / "checkpoints", "28m"):
        out = _run(_cmd(tiny_dataset, run, "train.max_steps=6"))
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
        text = out.stdout + out.stderr
        assert "checkpoint step 4 could not be written: No space left on device" in text
        assert "The previous checkpoint step-00000002 is intact" in text
        for rank in (0, 1):  # every rank says why it stopped: its own error or its peer's
            assert f"rdpt train (rank {rank}): " in text, text[-3000:]
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step-00000002"
        assert not (ckpts / "step-00000004").exists()
        assert not list(ckpts.glob(".tmp-*"))  # its space was given back
        verify_checkpoint(ckpts / "step-00000002")
        assert CheckpointManager(run).find_resume("auto").name == "step-00000002"


def test_disk_full_in_the_metrics_journal_is_a_clear_error(tmp_path):
    from pipeline.common.errors import RdptDiskFullError
    from pipeline.tracking.logger import RunTracker

    with small_filesystem(tmp_path / "run", "8k"):
        tracker = RunTracker(tmp_path / "run", enabled=False)
        with pytest.raises(RdptDiskFullError, match=r"metrics journal .*metrics.jsonl: no space"):
            for step in range(1, 10_000):
                tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step)
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        complete = [json.loads(x) for x in lines[:-1]]  # the line being written may be cut
        assert [r["step"] for r in complete] == list(range(1, len(complete) + 1))
        assert len(complete) > 10
