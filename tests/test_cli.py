"""The `rdpt` entry point: every command is registered, its --help says what it does with an
example, `rdpt --help` does not import the heavy libraries, and user errors exit 2 cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main

COMMANDS = [
    "prep",
    "model-info",
    "convert",
    "train",
    "export",
    "eval",
    "generate",
    "mlflow-server",
    "runs",
    "submit",
    "jobs",
]


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_description_and_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"rdpt {command}" in text.split("options:")[-1]  # an example in the epilog
    assert len(text.splitlines()) > 5


def test_top_level_help_is_light():
    code = (
        "import sys; from pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'megatron', 'mlflow') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_user_error_exits_2_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "Traceback" not in err
