"""TrainConfig: the run-level schema of `rdpt train` (one YAML file + dotted overrides).

    cfg = load_train_config("configs/train/tiny.yaml", ["optim.lr=3e-4", "run.name=x"])

Sections: run, data, model (a ModelConfig or a path to configs/model/*.yaml), recurrence,
train, optim, parallel, checkpoint, tracking, eval, debug. Rules that need only the config are
pydantic validators (they fire on load); rules that need the world size or the dataset live in
resolve.py, which `rdpt train` and `rdpt submit` both call before any process starts. Config
flows one way: YAML + overrides -> load_train_config -> resolve -> resolved.yaml -> the ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.common.config_io import ConfigModel, load_config
from pipeline.model.config import ModelConfig
from pipeline.training.recurrence import RecurrenceConfig


class RunSection(ConfigModel):
    name: str = "run"
    """Run name: the run directory is runs/<name> unless `dir` is given; also the MLflow run
    name."""
    dir: str | None = None
    """Run directory (resolved.yaml, metrics.jsonl, logs/, checkpoints/); default runs/<name>."""
    seed: int = 1234
    """Seed of parameter init, data order and the initial latent state."""


class PauseSection(ConfigModel):
    """Pause tokens inserted into task examples at load time (pipeline/data/task_loader.py):
    extra input positions before the answer; no loss on predicting them."""

    count: int = Field(0, ge=0)
    """Pause tokens per example (0 = none)."""
    placement: Literal["before_answer", "random"] = "before_answer"
    """before_answer: right before `=>`; random: anywhere after the first question token and
    before `=>`, drawn from (seed, sample id)."""
    seed: int = 0


class DataSection(ConfigModel):
    path: str = "data/corpus"
    """A dataset written by `rdpt prep` (holds manifest.json, train/ and val/ shards)."""
    shuffle: bool = True
    """Shuffle the training sequences (deterministically, by run.seed and epoch)."""
    pause: PauseSection = PauseSection()
    """Task datasets only (train.stage task or coconut)."""
    reasoning_steps: Literal["keep", "drop"] = "keep"
    """Task datasets, train.stage task: keep the language reasoning steps (chain of thought),
    or drop them (question => answer directly: the depth and pause-token baselines)."""


class TrainSection(ConfigModel):
    max_steps: int = Field(100, ge=1)
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    global_batch_size: int = Field(8, ge=1)
    """Sequences per optimizer step = micro_batch_size x data-parallel size x accumulation."""
    micro_batch_size: int = Field(1, ge=1)
    """Sequences per forward/backward on one rank."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
    stage: str = "pretrain"
    """What is trained and how one step runs: `pretrain` (next-token loss on packed sequences),
    `task` (fine-tuning on a task dataset: loss on reasoning steps and answer only, pause
    tokens per data.pause), `coconut` (continuous-thought curriculum, see `coconut`) or
    `exit_gate` (fits only the learned exit gate of model.exit_gate on a frozen model loaded
    by model.init_from, see `exit_gate`).
    Stages are modules of pipeline/training/stages/."""
    compile: Literal["auto"] | bool = "auto"
    """torch.compile the core iteration (the region that runs r times), the prelude and the
    coda (training/parallel.py::compile_model): on (true), off (false), or auto = on where CUDA
    is present, below ZeRO-3. YAML reads on/off as true/false."""
    peak_tflops: float | None = Field(None, gt=0)
    """Dense bf16 peak of one device in TFLOP/s, for train/mfu; default: looked up by the device
    name (pipeline/common/mfu.py: H100, H200, A100, B200, MI250X, MI300X). Without either, no
    MFU is logged (CPU)."""
    log_interval: int = Field(1, ge=1)
    """Log training metrics every N steps (rank 0 only; never blocks)."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """Stop (exit 86) after this many non-finite steps in a row, with a checkpoint of the last
    good state. Isolated non-finite steps are skipped and counted (train/skipped_steps)."""


class OptimSection(ConfigModel):
    name: Literal["adamw", "ellis_adam"] = "adamw"
    """`adamw` (torch/DeepSpeed AdamW) or `ellis_adam`, the published Huginn run's Adam variant:
    atan2 update without epsilon, per-tensor update clipping, moments initialised from the
    first gradient, weight decay relative to the peak lr (training/ellis_adam.py)."""
    impl: Literal["auto", "torch", "deepspeed"] = "auto"
    """adamw only: which implementation. auto = DeepSpeed's fused Adam where CUDA is present and
    its op is prebuilt, else torch's AdamW (fused kernel on CUDA, foreach on CPU); never a JIT
    build at start-up. torch = always torch's. deepspeed = DeepSpeed's FusedAdam even when it
    must be JIT-compiled first (needs nvcc matching CUDA)."""
    lr: float = Field(4e-5, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine = linear warmup then cosine; wsd = warmup-stable-decay; constant after warmup."""
    warmup_steps: int = Field(4096, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd only: fraction of max_steps spent in the final linear decay."""
    cooldown_steps: int | None = Field(None, ge=1)
    """wsd only: length of the final linear decay in steps (wins over decay_fraction; the
    published run: 4096)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    """adamw: added to the denominator. ellis_adam: has none; v is floored at eps^2 for the
    update-clipping ratio (the published run used 1e-6)."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay; norms, biases and qk_bias are not decayed. adamw removes
    lr * weight_decay of each weight per step (0.1 at lr 4e-5: 4e-6 per step). ellis_adam
    removes weight_decay * lr / peak lr per step (the published 4e-5: 4e-5 per step at the
    peak, which is adamw's weight_decay = 1.0)."""
    update_clipping: bool = True
    """ellis_adam only: divide a tensor's step by max(1, rms(g / sqrt(v)))."""
    running_init: bool = True
    """ellis_adam only: the moments start at the first gradient (g, g^2) instead of zeros."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 = off)."""

    @model_validator(mode="after")
    def _impl_fits_name(self) -> OptimSection:
        if self.name != "adamw" and self.impl == "deepspeed":
            raise ValueError(
                f"optim.impl=deepspeed applies to optim.name=adamw only; {self.name} is rdpt's "
                "own optimizer (use optim.impl=auto or torch)"
            )
        return self


class ParallelSection(ConfigModel):
    tp: int = Field(1, ge=1)
    """Tensor-parallel size (megatron-core); data-parallel size = world size / tp."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer, 2 +gradients, 3 +parameters."""
    activation_checkpointing: bool = False
    """Recompute each graded core iteration in backward instead of storing its activations
    (exact; memory per iteration drops to its input state)."""
    nproc: int = Field(1, ge=1)
    """Processes started by `rdpt train` on this machine (--nproc overrides; ignored under
    Slurm/torchrun, where the launcher sets the world size)."""


class CheckpointSection(ConfigModel):
    interval: int = Field(100, ge=1)
    """Save every N optimizer steps (and always at the end, on a signal, and on abort)."""
    keep_last: int = Field(3, ge=1)
    """Keep the last K complete checkpoints."""
    verify_on_load: bool = True
    """Check every file's sha256 before resuming (a corrupted checkpoint is refused by name)."""


class TrackingSection(ConfigModel):
    enabled: bool = True
    """Log to MLflow (metrics.jsonl is written either way)."""
    uri: str | None = None
    """MLflow tracking URI (http://..., sqlite:///...); default $MLFLOW_TRACKING_URI, else off."""
    experiment: str = "rdpt"
    artifact_max_mb: float = 64.0
    """Checkpoints up to this size are logged as artifacts; larger ones are referenced by path."""


class EvalSection(ConfigModel):
    interval: int = Field(100, ge=0)
    """Validation every N steps (0 = never; always at the end when > 0)."""
    recurrences: list[int] = [1, 4, 8, 32]
    """Fixed r at which validation loss is measured (val/loss_r{R})."""
    max_sequences: int = Field(64, ge=1)
    """Validation sequences per evaluation (the same fixed set every time)."""
    batch_size: int = Field(4, ge=1)


class CoconutSection(ConfigModel):
    """train.stage coconut: the continuous-thought curriculum (training/stages/coconut.py).
    At stage k the first k reasoning steps of every example are replaced by k x
    thoughts_per_step continuous thoughts between <|begin_thought|> and <|end_thought|>."""

    thoughts_per_step: int = 1
    """c: continuous thoughts per replaced reasoning step (>= 0; 0 removes the steps)."""
    max_stages: int = 3
    """The last stage (stage 0 is plain chain of thought); at most the dataset's largest
    number of reasoning steps."""
    epochs_per_stage: int = 1
    """Data epochs per stage: stage = min(first_stage + epoch // epochs_per_stage,
    max_stages)."""
    steps_per_stage: int | None = Field(None, ge=1)
    """When set, stages follow the optimizer step instead of the data epoch: stage =
    min(first_stage + step // steps_per_stage, max_stages) (stages shorter than an epoch of a
    large dataset)."""
    pad_thoughts: bool = False
    """At stage k every example gets k x thoughts_per_step thoughts, also one with fewer than k
    reasoning steps (the Coconut authors' pad_latent_to_max): the count no longer depends on
    the example, so `rdpt eval --task --thoughts` can give every test question the number the
    last stage trained with."""
    first_stage: int = Field(0, ge=0)
    """The stage the run starts in: 1 when model.init_from is a run that already trained the
    chain of thought (stage 0), as the Coconut recipe starts from a CoT-trained model."""
    feedback: Literal["coda", "core"] = "coda"
    """The state fed back as the next thought's input vector: `coda` (the coda's normed
    output, what the head reads; Coconut's last hidden state) or `core` (the latent state
    after the last core iteration, before the coda)."""

    @model_validator(mode="after")
    def _checks(self) -> CoconutSection:
        if self.thoughts_per_step < 0:
            raise ValueError(
                f"coconut.thoughts_per_step: the number of continuous thoughts per reasoning "
                f"step must be >= 0, got {self.thoughts_per_step}"
            )
        if self.max_stages < 0:
            raise ValueError(f"coconut.max_stages: must be >= 0, got {self.max_stages}")
        if self.epochs_per_stage < 1:
            raise ValueError(f"coconut.epochs_per_stage: must be >= 1, got {self.epochs_per_stage}")
        if self.first_stage > self.max_stages:
            raise ValueError(
                f"coconut.first_stage={self.first_stage} is beyond "
                f"coconut.max_stages={self.max_stages}"
            )
        return self

    def stage_at(self, epoch: int, step: int = 0) -> int:
        """The curriculum stage of a micro-batch of data epoch `epoch` at optimizer step
        `step` (0-based; only read when steps_per_stage is set)."""
        if self.steps_per_stage:
            done = step // self.steps_per_stage
        else:
            done = epoch // self.epochs_per_stage
        return min(self.first_stage + done, self.max_stages)


class ExitGateSection(ConfigModel):
    """train.stage exit_gate: the target the learned exit gate is fitted to
    (pipeline/model/exit_gate.py). With CE_i the loss after core iteration i, the gain of
    going on is CE_i - CE_{i+1} (`next`) or CE_i - min over later iterations (`remaining`), and
    the exit target is sigmoid(sharpness * (min_gain - gain))."""

    target: Literal["next", "remaining"] = "next"
    """`next`: what the next iteration still gains; `remaining`: what the best later iteration
    (up to recurrence.fixed) gains, which does not stop at a plateau before a later drop."""
    min_gain: float = Field(0.01, ge=0)
    """Gain in nats per token below which stopping is the target (y = 0.5 at exactly this)."""
    sharpness: float = Field(200.0, gt=0)
    """Slope of the soft target per nat (200: y goes from 0.88 to 0.12 as the gain moves from
    min_gain - 0.01 to min_gain + 0.01)."""
    balance: bool = False
    """Weight the exit and the go-on targets so that each class counts as much as the other in
    a micro-batch (BCE pos_weight = (1 - mean y) / mean y). With a long horizon most targets say
    exit (a position gains little after its first iterations), and an unweighted gate learns
    that average: "exit" everywhere."""


class TelemetrySection(ConfigModel):
    """Model and optimizer telemetry (the published run's): latent-state norm and token
    correlation, per-iteration state change, per-block gradient norms, update RMS, effective
    lr. Computed only on due steps, from what the step already holds."""

    interval: int = Field(50, ge=0)
    """Every N optimizer steps (0 = off); into metrics.jsonl and MLflow as telemetry/*."""


class DebugSection(ConfigModel):
    """Testing knobs: never needed for real runs."""

    record_sample_ids: bool = False
    """Write logs/samples-rank{R}.jsonl: the sample ids each rank trained on, per step."""
    nan_at_steps: list[int] = []
    """Make the loss (and so the gradients) NaN at these steps (0-based optimizer steps)."""
    inf_loss_at_steps: list[int] = []
    """Make the loss +Inf at these steps."""
    inf_grad_at_steps: list[int] = []
    """Keep the loss finite but make its gradients +Inf at these steps."""
    kill_in_checkpoint: list[str] = []
    """"STEP:PHASE:RANK": SIGKILL rank RANK while writing checkpoint STEP, at PHASE = engine
    (inside DeepSpeed's save, after its first file), files (all written, none hashed) or
    renamed (final name, `latest` not yet moved; rank 0)."""
    sleep_per_step_s: float = Field(0.0, ge=0)
    """Sleep after each step (lets tests signal or kill a run mid-way)."""


class TrainConfig(ConfigModel):
    """Everything `rdpt train` needs; saved as <run_dir>/resolved.yaml."""

    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelConfig = ModelConfig()
    recurrence: RecurrenceConfig = RecurrenceConfig()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    eval: EvalSection = EvalSection()
    telemetry: TelemetrySection = TelemetrySection()
    coconut: CoconutSection = CoconutSection()
    exit_gate: ExitGateSection = ExitGateSection()
    debug: DebugSection = DebugSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        t = self.train
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        if any(r < 1 for r in self.eval.recurrences):
            raise ValueError(f"eval.recurrences: every r must be >= 1, got {self.eval.recurrences}")
        if self.model.init.mean_recurrence is None:  # the init's unrolled depth uses rbar
            self.model.init.mean_recurrence = self.recurrence.mean
        return self

    def run_dir(self) -> Path:
        """runs/<run.name> unless run.dir is set."""
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


def load_train_config(path: str | os.PathLike | None, overrides=()) -> TrainConfig:
    """Read a train YAML (with model/recurrence includes) and apply dotted overrides."""
    return load_config(TrainConfig, path, overrides)
