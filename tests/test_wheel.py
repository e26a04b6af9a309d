"""A built wheel is a working rdpt: `pip install` of the package built from a clean copy of the
tracked files (not editable) gives an `rdpt` whose `submit --dry-run` renders the sbatch
templates, run from a directory outside the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_wheel_renders_the_sbatch_templates_and_builds_the_decode_kernels(
    tmp_path, tiny_dataset, c_compiler
):
    # a clean copy of what git tracks (no build/ or egg-info left in the repository)
    src = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            dest.symlink_to((REPO / name).readlink())
        else:
            shutil.copy2(REPO / name, dest)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = wheels.glob("rdpt-*.whl")

    # a fresh venv; the dependencies come from this one (a path entry, not a site dir: the
    # editable install's finder there is not activated), rdpt itself from the wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "rdpt-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import pipeline, launch.render as r; print(pipeline.__file__); "
            "print(sorted(p.name for p in r.TEMPLATE_DIR.glob('*.sbatch'))); "
            "import pipeline.model.native_kernels as nk; "
            "print(nk.SOURCE.is_file(), nk.load() is not None, nk.unavailable_reason())",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert where[0].startswith(site), where
    assert where[1] == "['prep-array.sbatch', 'prep-finalize.sbatch', 'train.sbatch']"
    assert where[2] == "True True None", where  # the C source ships; it builds under $HOME
    out = subprocess.run(
        [
            str(venv / "bin" / "rdpt"),
            "submit",
            "train",
            str(REPO / "configs/train/tiny.yaml"),
            f"data.path={tiny_dataset}",
            f"run.dir={tmp_path / 'run'}",
            "--gpus-per-node",
            "0",
            "--ntasks-per-node",
            "2",
            "--time",
            "1:00:00",
            "--dry-run",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --ntasks-per-node=2" in out.stdout
    assert f"train {tmp_path / 'run'}/resolved.yaml --resume auto" in out.stdout
    assert "{{" not in out.stdout  # every placeholder was filled
