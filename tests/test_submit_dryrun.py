"""`rdpt submit --dry-run` renders every option; every bad input fails before sbatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs/train/tiny.yaml")

SITE = """\
slurm:
  partition: sitepart
  time: "12:00:00"
  signal_warn_s: 240
  extra_sbatch: ["--reservation=big"]
env:
  modules: [cuda/12.4, nccl/2.21]
  setup: ["source /opt/venvs/rdpt/bin/activate"]
  python: /opt/venvs/rdpt/bin/python
  variables: {NCCL_DEBUG: WARN, HF_HOME: /scratch/hf}
  container:
    image: "nvcr.io#nvidia/pytorch:24.05-py3"
    runtime: pyxis
    mounts: ["/scratch:/scratch"]
"""


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_dataset):
    """A project directory with a site config; no Slurm config (dry runs need none)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-slurm.conf"))
    monkeypatch.delenv("RDPT_SITE_CONFIG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "site.yaml").write_text(SITE)
    return tmp_path


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def scripts_of(out: str) -> list[str]:
    """The job scripts printed by a dry run."""
    parts = out.split("# ---- job script")[1:]
    return [p.split("\n", 1)[1].split("\n# dry run")[0] for p in parts]


def resolved_of(out: str) -> dict:
    text = out.split("# ---- resolved config")[1].split("\n", 1)[1].split("# ---- job script")[0]
    return yaml.safe_load(text)


def test_dry_run_renders_every_train_option(project, capsys, tiny_dataset):
    rc, out, err = run_cli(
        capsys,
        "submit",
        "train",
        TINY,
        "--site",
        "site.yaml",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--cpus-per-task",
        "6",
        "--mem",
        "64G",
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--qos",
        "high",
        "--constraint",
        "a100",
        "--exclusive",
        "--mail-user",
        "me@example.org",
        "--mail-type",
        "ALL",
        "--signal-warn",
        "600",
        "--chain",
        "2",
        "--job-name",
        "myjob",
        "--dry-run",
        f"data.path={tiny_dataset}",
        "run.name=big",
        "train.micro_batch_size=2",
    )
    assert rc == 0, err
    first, second = scripts_of(out)
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=6",
        "--mem=64G",
        "--time=2-00:00:00",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=a100",
        "--exclusive",
        "--mail-user=me@example.org",
        "--mail-type=ALL",
        "--reservation=big",
        "--job-name=myjob",
        "--signal=B:USR1@600",
        "--requeue",
        "--open-mode=append",
        f"--output={project}/runs/big/slurm/slurm-%j.out",
        f"--chdir={project}",
    ):
        assert f"#SBATCH {line}\n" in first, line
    assert "--partition=sitepart" not in first  # the command line beats the site config
    assert "module load cuda/12.4\nmodule load nccl/2.21\n" in first
    assert "source /opt/venvs/rdpt/bin/activate" in first
    assert "export NCCL_DEBUG=WARN" in first and "export HF_HOME=/scratch/hf" in first
    assert "export OMP_NUM_THREADS=6" in first
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in first
    assert "--container-mounts=/scratch:/scratch" in first and "--cpus-per-task=6" in first
    assert "srun --kill-on-bad-exit=0 --wait=120 --export=ALL" in first
    run_dir = project / "runs" / "big"
    assert (
        f"/opt/venvs/rdpt/bin/python -m pipeline.cli train {run_dir}/resolved.yaml --resume auto"
    ) in first
    # chain: the first job hands over, the last one requeues itself; afterany dependency
    assert "REQUEUE_ON_SIGNAL=0" in first and "REQUEUE_ON_SIGNAL=1" in second
    assert "job 1 of 2" in first and "job 2 of 2" in second
    assert "(--dependency=afterany:<previous job>)" in out
    # the resolved config is the one the job reads: absolute paths, world size, dataset vocab
    cfg = resolved_of(out)
    assert cfg["run"]["dir"] == str(run_dir) and cfg["data"]["path"] == str(tiny_dataset)
    assert cfg["parallel"]["nproc"] == 8 and cfg["train"]["micro_batch_size"] == 2
    manifest = yaml.safe_load((tiny_dataset / "manifest.json").read_text())
    assert cfg["model"]["vocab_size"] == manifest["vocab_size"]
    for script in (first, second):  # valid bash
        check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr
    # a dry run writes nothing and submits nothing
    assert not run_dir.exists() and not (project / ".rdpt").exists()
    assert "nothing was written or submitted" in out


def test_dry_run_site_defaults_cpu_and_apptainer(project, capsys, tiny_dataset):
    site = yaml.safe_load(SITE)
    site["env"]["container"] = {
        "image": "/images/rdpt.sif",
        "runtime": "apptainer",
        "mounts": ["/data:/data"],
    }
    del site["env"]["python"]
    (project / "site2.yaml").write_text(yaml.safe_dump(site))
    rc, out, err = run_cli(
        capsys,
        "submit",
        "train",
        TINY,
        "--gpus-per-node",
        "0",
        "--ntasks-per-node",
        "2",
        "--dry-run",
        f"data.path={tiny_dataset}",
        "run.name=cpu",
        "--site",
        "site2.yaml",
    )
    assert rc == 0, err
    (script,) = scripts_of(out)
    assert "#SBATCH --partition=sitepart\n" in script and "#SBATCH --time=12:00:00\n" in script
    assert "#SBATCH --signal=B:USR1@240\n" in script
    assert "#SBATCH --ntasks-per-node=2\n" in script and "--gpus-per-node" not in script
    assert "#SBATCH --nodes=1\n" in script and "--account" not in script
    assert (
        f"apptainer exec --nv --bind /data:/data /images/rdpt.sif {sys.executable} -m "
        "pipeline.cli train" in script
    )
    assert "--container-image" not in script and "REQUEUE_ON_SIGNAL=1" in script
    assert "#SBATCH --mail-user" not in script and "#SBATCH --exclusive" not in script


def test_site_config_from_environment_and_errors(project, capsys, tiny_dataset, monkeypatch):
    monkeypatch.setenv("RDPT_SITE_CONFIG", str(project / "site.yaml"))
    rc, out, err = run_cli(
        capsys,
        "submit",
        "train",
        TINY,
        "--dry-run",
        f"data.path={tiny_dataset}",
        "train.micro_batch_size=4",
    )
    assert rc == 0, err
    assert "#SBATCH --partition=sitepart" in out
    (project / "bad-site.yaml").write_text("slurm: {partition: x, gpus: 4}\n")
    rc, out, err = run_cli(
        capsys,
        "submit",
        "train",
        TINY,
        "--dry-run",
        "--site",
        "bad-site.yaml",
        f"data.path={tiny_dataset}",
    )
    assert rc == 2 and "bad-site.yaml: unknown key 'slurm.gpus'" in err


def test_dry_run_prep(project, capsys):
    (project / "prep.yaml").write_text(
        "inputs: [corpus]\noutput: data/web\nseq_len: 64\ntokenizer: {vocab_size: 512}\n"
    )
    rc, out, err = run_cli(
        capsys,
        "submit",
        "prep",
        "prep.yaml",
        "--array",
        "3",
        "--cpus-per-task",
        "4",
        "--time",
        "1:00:00",
        "--partition",
        "cpu",
        "--site",
        "site.yaml",
        "--dry-run",
        "val_fraction=0.05",
    )
    assert rc == 0, err
    array, final = scripts_of(out)
    assert "#SBATCH --array=0-2\n" in array and "#SBATCH --cpus-per-task=4\n" in array
    assert "#SBATCH --partition=cpu\n" in array and "#SBATCH --time=1:00:00\n" in array
    assert "--task-index env" in array and "prep-%A_%a.out" in array
    assert "--finalize" in final and "--array" not in final
    assert "(--dependency=afterok:<previous job>)" in out
    cfg = resolved_of(out)
    assert cfg["output"] == str(project / "data/web") and cfg["inputs"] == [str(project / "corpus")]
    assert cfg["val_fraction"] == 0.05 and cfg["workers"] == 4
    assert not (project / ".rdpt").exists()


BAD_DRY = [
    (["--time", "abc"], "is not a Slurm time"),
    (["--time", "5", "--signal-warn", "300"], "--signal-warn 300 s is not shorter than --time 5"),
    (["--chain", "0"], "--chain must be >= 1"),
    (["--mail-user", "nobody"], "is not an e-mail address"),
    (["--gpus-per-node", "4", "parallel.tp=3"], "not a multiple of parallel.tp=3"),
    (
        ["--nodes", "3", "--gpus-per-node", "0", "--ntasks-per-node", "1"],
        "global_batch_size=16 is not divisible",
    ),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["data.path=/nonexistent/dataset"], "/nonexistent/dataset' does not exist"),
    (["run.dir=site.yaml/run"], "is not writable"),
]


@pytest.mark.parametrize("args,message", BAD_DRY, ids=[m for _, m in BAD_DRY])
def test_bad_input_is_caught_in_a_dry_run(project, capsys, tiny_dataset, args, message):
    rc, out, err = run_cli(
        capsys, "submit", "train", TINY, "--dry-run", f"data.path={tiny_dataset}", *args
    )
    assert rc == 2, out
    assert message in err and "error" in err
    assert "# ---- job script" not in out


def test_help_has_examples(capsys):
    for argv in (
        ["submit", "--help"],
        ["submit", "train", "--help"],
        ["submit", "prep", "--help"],
        ["jobs", "--help"],
        ["jobs", "cancel", "--help"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "rdpt " in out.split("example", 1)[1]


def test_example_site_config_is_valid(project, capsys, tiny_dataset):
    rc, out, err = run_cli(
        capsys,
        "submit",
        "train",
        TINY,
        "--site",
        str(REPO / "configs/site/example.yaml"),
        "--dry-run",
        f"data.path={tiny_dataset}",
        "train.micro_batch_size=2",
    )
    assert rc == 0, err
    (script,) = scripts_of(out)
    assert "#SBATCH --gpus-per-node=8\n" in script and "#SBATCH --account=my-project\n" in script
    assert "module load cuda/12.4" in script and "export NCCL_DEBUG=WARN" in script


def test_prep_bad_input(project, capsys):
    (project / "no-output.yaml").write_text("inputs: [corpus]\nseq_len: 64\n")
    rc, out, err = run_cli(capsys, "submit", "prep", "no-output.yaml", "--array", "2", "--dry-run")
    assert rc == 2 and "no-output.yaml: `output` is not set" in err
    rc, out, err = run_cli(
        capsys, "submit", "prep", "no-output.yaml", "--array", "0", "--dry-run", "output=x"
    )
    assert rc == 2 and "--array must be between 1 and 10000, got 0" in err
    rc, out, err = run_cli(
        capsys,
        "submit",
        "prep",
        "no-output.yaml",
        "--array",
        "2",
        "--dry-run",
        "output=x",
        "seq_len=zero",
    )
    assert rc == 2 and "seq_len" in err and "expected an integer" in err
