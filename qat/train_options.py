"""What `trellis qat` takes: the options of a BCJR-QAT run, each a flag with its help
(trellis_cli/options.py), and the temperature schedule they set.

Kept apart from qat.train, which runs the training, so that the run's parts and the command's flags
read the options without importing the training code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from trellis_runtime.devices import DEFAULT_DEVICE, Device
from trellis_runtime.errors import TrellisError


Loss = Literal["kl", "mse"]
STAGES = ("bcjr", "finetune")  # in the order a recipe runs them
# Fine-tuning steps by device: the CPU default fits the recipe's time on 2 cores (README, Measured);
# a GPU runs the same steps in seconds, so it takes more text.
FINETUNE_STEPS = {"cpu": 384, "cuda": 1024}
# The default stages by device. On CPU BCJR-QAT reaches one layer in the recipe's time, and fine-tuning
# after it ended worse than fine-tuning the PTQ checkpoint directly (README, Measured); a GPU runs
# BCJR-QAT over every layer first.
DEFAULT_STAGES = {"cpu": "finetune", "cuda": "bcjr,finetune"}


@dataclass(frozen=True)
class QatOptions:
    """What `trellis qat` takes: each field is a flag (trellis_cli/options.py) with this help,
    except those marked "flag": False, which only a library caller sets."""

    stages: str | None = field(default=None, metadata={
        "help": "comma-separated stages, run in this order: bcjr (train the codes through the soft "
                "trellis), finetune (distil the vectors, norms and tables end to end, codes frozen); "
                f"default {DEFAULT_STAGES['cpu']} on CPU, {DEFAULT_STAGES['cuda']} on CUDA"})
    layers: str = field(default="auto", metadata={
        "help": "all, auto (CPU: the layer whose quantization costs the most; CUDA: all) or "
                "comma-separated layer indices"})
    steps: int = field(default=12, metadata={"help": "optimizer steps, one text window each"})
    lr: float | None = field(default=None, metadata={
        "help": "AdamW learning rate in units of each matrix's scale (default: twice the largest "
                "measured Voronoi radius spread over the steps)"})
    t_start: float = field(default=0.3, metadata={"help": "first temperature"})
    t_end: float = field(default=0.05, metadata={"help": "last temperature (exponential)"})
    calib_text: str | None = field(default=None, metadata={
        "help": "UTF-8 text file (default: the built-in news articles and Wikipedia calibration "
                "text)"})
    teacher: str | None = field(default=None, metadata={
        "help": "float model to distil from (default: the checkpoint's source)"})
    ctx: int = field(default=1024, metadata={"help": "tokens per training window"})
    eval_every: int = field(default=4, metadata={
        "help": "steps between hardened snapshots (scored; the best is kept)"})
    validation_tokens: int = field(default=8192, metadata={"flag": False})
    loss: Loss = field(default="kl", metadata={
        "help": "kl: full-vocabulary KL to the teacher; mse: per-layer output MSE"})
    train_table: bool = field(default=False, metadata={"help": "also train the code table"})
    train_scale: bool = field(default=False, metadata={"help": "also train each matrix's scale"})
    finetune_steps: int | None = field(default=None, metadata={
        "help": f"fine-tuning steps, one text window of --finetune-ctx tokens each (default: "
                f"{FINETUNE_STEPS['cpu']} on CPU, {FINETUNE_STEPS['cuda']} on CUDA)"})
    finetune_lr: float = field(default=2e-3, metadata={
        "help": "fine-tuning AdamW learning rate of the vectors and norms (cosine decay)"})
    finetune_ctx: int = field(default=512, metadata={"help": "tokens per fine-tuning window"})
    finetune_table: bool = field(default=True, metadata={
        "help": "keep the code tables (hyb, lut) as quantized; by default fine-tuning trains them "
                "with the vectors and norms"})
    finetune_embeddings: bool = field(default=False, metadata={
        "help": "fine-tune the embeddings and the output head too (16-bit, no bits added)"})
    clip: float = field(default=1.0, metadata={"flag": False})
    seed: int = 0
    device: Device = DEFAULT_DEVICE

    def temperature(self, step: int) -> float:
        """Exponential schedule t_start -> t_end over the steps (step counts from 0)."""
        if self.steps == 1:
            return self.t_end
        return self.t_start * (self.t_end / self.t_start) ** (step / (self.steps - 1))

    def finetune_step_count(self) -> int:
        """--finetune-steps, or the device's default."""
        if self.finetune_steps is not None:
            return self.finetune_steps
        return FINETUNE_STEPS[self.device]

    def stage_list(self) -> list[str]:
        """The stages to run, in order; a TrellisError for an unknown, repeated or misordered one."""
        text = self.stages if self.stages is not None else DEFAULT_STAGES[self.device]
        stages = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [stage for stage in stages if stage not in STAGES]
        if not stages or unknown or len(set(stages)) != len(stages) or \
                stages != sorted(stages, key=STAGES.index):
            raise TrellisError(f"--stages must name some of {', '.join(STAGES)} once each, in "
                               f"that order; got {self.stages!r}")
        return stages

    def check(self) -> None:
        self.stage_list()
        if self.finetune_step_count() < 1 or self.finetune_ctx < 2 or not self.finetune_lr > 0:
            raise TrellisError("--finetune-steps must be at least 1, --finetune-ctx at least 2 and "
                               "--finetune-lr positive")
        if self.steps < 1:
            raise TrellisError(f"--steps must be at least 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise TrellisError(f"--lr must be positive, got {self.lr}")
        if not (0 < self.t_end <= self.t_start):
            raise TrellisError(f"temperatures must satisfy 0 < --t-end <= --t-start, got "
                               f"{self.t_start} -> {self.t_end}")
        if self.t_end < 1e-2:
            raise TrellisError(f"--t-end {self.t_end} is below 0.01, where float32 forward-backward "
                               f"loses its precision")
        if self.loss not in get_args(Loss):
            raise TrellisError(f"--loss must be {' or '.join(get_args(Loss))}, got {self.loss!r}")
        if self.eval_every < 1:
            raise TrellisError(f"--eval-every must be at least 1, got {self.eval_every}")
