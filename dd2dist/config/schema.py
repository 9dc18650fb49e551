"""The experiment configuration: one frozen dataclass per section, defaults = the tiny CPU recipe.

``configs/base.yaml`` writes these defaults out (a test keeps the two equal). Ranges and file paths are declared
in field metadata and enforced by :func:`dd2dist.config.typed.from_dict` when a config is loaded; cross-field
rules live in each section's ``__post_init__`` and raise :class:`ConfigError` with a key relative to the
section (the loader prefixes the section's own key). Paper values (docs/method.md §13, Tab.10/11) are quoted in the
comments where the tiny default differs.

Owners of later subsystems add their fields to their own section class; keep each section one class.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from dd2dist.conditions import Sampling
from dd2dist.config.typed import ConfigError
from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig, VARConfig
from dd2dist.text.encoders import text_encoder_geometry

Stage = Literal["stage1", "stage2", "alignment"]
STAGE_ORDER: tuple[str, ...] = ("stage1", "stage2", "alignment")
LLAMAGEN_INPUT_ADAPTERS = ("snap", "soft", "mlp")


def _f(default: Any, **meta: Any) -> Any:
    """A field with a default and validation metadata (ge/gt/le/lt/choices/path)."""
    return field(default=default, metadata=meta)


def _section(cls: type, **meta: Any) -> Any:
    return field(default_factory=cls, metadata=meta)


def _is_uri(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen AR teacher (docs/teachers.md) and the sampling setting that is the distillation target."""

    family: Literal["var", "llamagen"] = "var"
    official: str | None = _f(None, choices=tuple(OFFICIAL_ARCHS))  # released arch; None = our own var/llamagen
    checkpoint: str | None = _f(None, path="file")  # official weights, or a dd2dist teacher state dict
    tokenizer_checkpoint: str | None = _f(None, path="file")  # official VQ weights (needed with `official`)
    # Without a checkpoint the teacher has random weights. Only the tiny test teachers say that is meant; anywhere
    # else a forgotten teacher.checkpoint would distil a random teacher for the whole run, so the launch refuses it.
    random_init: bool = False
    var: VARConfig = _section(VARConfig)  # architecture when family=var and official is None
    llamagen: LlamaGenConfig = _section(LlamaGenConfig)  # architecture when family=llamagen and official is None
    # Target distribution of the distillation (docs/method.md §3.3, §13.5: CFG 2.0; paper top-k 900 for VAR, 8000 for
    # LlamaGen; tiny vocabularies keep filtering off). VAR's own rule is "var_linear", LlamaGen's "constant".
    sampling: Sampling = field(default_factory=lambda: Sampling(guidance_scale=2.0, guidance_schedule="var_linear"))
    dtype: Literal["float32", "bfloat16"] = "float32"  # teacher forward precision (closed form stays fp32)
    # Captions -> Cond.text of a text-to-image teacher: a dd2dist.text.build_text_encoder spec
    # ("hashed:slots=16,width=64", "t5:<dir>"). Part of the teacher: it fixes what each caption slot means.
    text_encoder: str | None = None

    def __post_init__(self) -> None:
        if self.official is not None:
            official_family = "var" if self.official.startswith("var_") else "llamagen"
            if official_family != self.family:
                raise ConfigError(
                    "official",
                    f"{self.official!r} is a {official_family} model but teacher.family is {self.family!r}",
                )
            # The family section is ignored when official is set: refuse values that would silently not apply.
            own, default = getattr(self, self.family), type(getattr(self, self.family))()
            if own not in (default, OFFICIAL_ARCHS[self.official]):
                raise ConfigError(
                    self.family,
                    f"is ignored when teacher.official={self.official!r} (the released architecture is used); "
                    "remove it or leave it at its defaults",
                )
        s = self.sampling
        if s.top_k < 0:
            raise ConfigError("sampling.top_k", f"must be >= 0 (0 = off), got {s.top_k}")
        if not 0.0 < s.top_p <= 1.0:
            raise ConfigError("sampling.top_p", f"must be in (0, 1] (1 = off), got {s.top_p}")
        if s.temperature <= 0:
            raise ConfigError("sampling.temperature", f"must be > 0, got {s.temperature}")
        if s.guidance_scale < 0:
            raise ConfigError("sampling.guidance_scale", f"must be >= 0, got {s.guidance_scale}")
        if self.llamagen.input_adapter not in LLAMAGEN_INPUT_ADAPTERS:
            raise ConfigError(
                "llamagen.input_adapter",
                f"must be one of {', '.join(LLAMAGEN_INPUT_ADAPTERS)}; got {self.llamagen.input_adapter!r}",
            )
        self._check_text_encoder()

    def _check_text_encoder(self) -> None:
        """A text teacher of our own needs its encoder (features made by another encoder mean nothing to it), and
        the encoder must fill exactly the teacher's caption slots and width."""
        arch = self.arch
        text_teacher = self.family == "llamagen" and arch.caption_dim > 0
        if self.text_encoder is None:
            if text_teacher and self.official is None:
                raise ConfigError("text_encoder", "must be set for a text-conditional teacher (llamagen.caption_dim "
                                  f"{arch.caption_dim} > 0), e.g. 'hashed:slots={arch.cls_token_num},"
                                  f"width={arch.caption_dim}'")
            return
        if not text_teacher:
            raise ConfigError("text_encoder", "is only for a text-conditional llamagen teacher (caption_dim > 0); "
                              f"this teacher is class-conditional: set it to null, got {self.text_encoder!r}")
        try:
            slots, width = text_encoder_geometry(self.text_encoder)
        except ValueError as err:
            raise ConfigError("text_encoder", str(err)) from None
        if slots is not None and slots != arch.cls_token_num:
            raise ConfigError("text_encoder", f"{self.text_encoder!r} gives {slots} caption slots but the teacher's "
                              f"cls_token_num is {arch.cls_token_num}")
        if width is not None and width != arch.caption_dim:
            raise ConfigError("text_encoder", f"{self.text_encoder!r} gives {width}-wide features but the teacher's "
                              f"caption_dim is {arch.caption_dim}")

    @property
    def arch(self) -> VARConfig | LlamaGenConfig:
        """The architecture in use: the released one when ``official`` is set, else the family's section."""
        if self.official is not None:
            return OFFICIAL_ARCHS[self.official]
        return self.var if self.family == "var" else self.llamagen


@dataclass(frozen=True)
class StudentConfig:
    """Generator / guidance networks: teacher backbone + MAR-style AdaLN MLP head (docs/method.md §5.2)."""

    head_width: int = _f(128, gt=0)  # MLP width w (paper-scale proposal: 1024)
    head_depth: int = _f(2, gt=0)  # AdaLN residual blocks (paper-scale proposal: 3-6)
    time_embed_dim: int = _f(64, gt=0)  # sinusoidal t-embedding size before its MLP
    generator_time: float = _f(1.0, gt=0.0, le=1.0)  # t fed to the generator's head (docs/method.md §5.4)
    # "mlp" adds a zero-initialised MLP of each raw input vector (dd2dist/nets/vector_input.py): LlamaGen students
    # reading vectors through the soft rule add it to that vector's embedding, so the generator sees its noise, not
    # just its code cell; VAR students add each scale's to the input embeddings of the next scale's tokens above it
    noise_input: Literal["none", "mlp"] = "none"
    # The head's velocity is the closed-form posterior of the student's own code logits (a trainable copy of the
    # teacher's output layer on the backbone features; VAR: on its class-modulated head_nm output) plus the MLP head
    # as a correction, so stage 1 and the guidance network start at the teacher's conditionals (dd2dist/nets/student.py)
    posterior_head: bool = False
    # With a posterior head: whether the generator's one-step output includes its mixture part too. At t = 1 that
    # part is the logits' softmax mean of the codes, whatever the noise, so the noise reaches the output through the
    # MLP alone; false keeps the mixture in the guidance network (and the stage-1 model's AR sampler) only and lets
    # the generator's output be eps - MLP, as with the plain head (docs/method.md §12.10)
    generator_posterior: bool = True
    # The generator's soft-snap output layer (dd2dist/nets/output_snap.py): 0 = off (the paper's continuous outputs);
    # s > 0 replaces each output by the codes' mean under softmax(-|q - c|² / (2 (s x median code spacing)²)), so that
    # outputs sit on the codes except near the boundaries between them. The PF-ODE regression fits the map before it.
    generator_snap: float = _f(0.0, ge=0.0)
    # "categorical": the generator outputs codes, each drawn from its posterior head's code distribution by the
    # position's own noise (dd2dist/nets/categorical.py), and stage 2 trains it with the exact per-position KL to the
    # teacher given its own prefix instead of CSD with a guidance network (dd2dist/method/losses.py)
    generator_output: Literal["continuous", "categorical"] = "continuous"
    # The order a categorical generator's inverse CDF runs over the codes: their index, or their place along the
    # codebook's first principal axis, so that neighbouring noise picks neighbouring codes (dd2dist/nets/categorical.py)
    categorical_order: Literal["index", "principal"] = "index"
    # A categorical generator's head reads the codes it picked at earlier positions (a loop of a small MLP after the
    # one backbone pass, dd2dist/nets/neighbour_picks.py), so that the backbone need not rebuild those tokens from
    # their noise: LlamaGen at each position's left and upper neighbours (left, left_up; left_up_prefix adds the mean
    # embedding of every earlier pick), VAR at the same place in every earlier scale (parents)
    neighbour_picks: Literal["none", "left", "left_up", "left_up_prefix", "parents"] = "none"
    # No longer read: LlamaGen students now read vectors through the teacher's soft rule (dd2dist/nets/student.py)
    # instead of a regressed input MLP. Accepted so that the configs of earlier runs still load.
    adapter_regress_steps: int = _f(200, ge=0)
    adapter_regress_lr: float = _f(1e-3, gt=0.0)


@dataclass(frozen=True)
class DataConfig:
    """Where stage 1/2 teacher sequences come from."""

    source: Literal["online", "shards"] = "online"  # sample the teacher on the fly, or read teacher-token shards
    shards: str | None = _f(None, path="pattern")  # .tar directory, brace pattern or glob (source=shards)
    batch_size: int = _f(8, gt=0)  # sequences per rank per loader / online-sampling call
    shuffle_buffer: int = _f(64, ge=0)  # samples in the streaming shuffle buffer; 0 = no shuffling
    num_loader_workers: int = _f(0, ge=0)  # DataLoader worker processes per rank; 0 = in-process
    label_mode: Literal["balanced", "random"] = "balanced"  # class labels for online sampling
    # Captions of a text-conditional teacher for the draws not read from data (stage 2, PF-ODE pairs, online
    # stage 1): text-conditional token shards or a caption set (a directory with captions.json); None = data.shards.
    # Each rank keeps the first caption_bank_size distinct captions of its share in memory (dd2dist/train/
    # condition_source.py). Checked when the captions are read (a caption set need not hold .tar files).
    captions: str | None = None
    caption_bank_size: int = _f(4096, gt=0)

    def __post_init__(self) -> None:
        if self.source == "shards" and not self.shards:
            raise ConfigError("shards", "must be set when data.source is 'shards'")
        if self.captions is not None and "://" not in self.captions:
            # stored absolute, like the path fields: Ray workers do not run in the driver's directory
            object.__setattr__(self, "captions", os.path.abspath(os.path.expanduser(self.captions)))


@dataclass(frozen=True)
class Stage0Config:
    """LlamaGen continuous-input adaptation (docs/method.md §6), run by jobs/adapt_llamagen.py before stage 1.

    (1) regress an MLP input adapter onto ``tok_embeddings`` over all normalised codes, (2) fine-tune the whole GPT
    with AR cross-entropy on ``data.shards`` (or on raw teacher samples when ``data.source`` is online), at
    ``data.batch_size`` sequences per step. The paper gives only the 200k fine-tune iterations; the optimiser values
    are LlamaGen's own training defaults (AdamW, LR 1e-4, betas (0.9, 0.95), weight decay 0.05, clip 1.0).
    """

    regress_steps: int = _f(300, ge=0)  # Adam steps on the adapter before its exact least-squares output layer
    regress_lr: float = _f(1e-3, gt=0.0)
    regress_batch: int = _f(0, ge=0)  # codes per regression step; 0 = all V codes
    finetune_steps: int = _f(20, ge=0)  # AR cross-entropy steps (paper: 200k)
    lr: float = _f(1e-4, gt=0.0)
    betas: tuple[float, float] = _f((0.9, 0.95), ge=0.0, lt=1.0)  # AdamW betas
    weight_decay: float = _f(0.05, ge=0.0)
    grad_clip: float = _f(1.0, ge=0.0)  # max global grad norm; 0 = off
    cond_drop_prob: float = _f(0.1, ge=0.0, lt=1.0)  # condition -> null (keeps the CFG null path trained)
    eval_batches: int = _f(2, ge=0)  # held-out batches for the cross-entropy before/after comparison


@dataclass(frozen=True)
class Stage1Config:
    """AR-diffusion tuning with the GTS loss (docs/method.md §7; paper values Tab.10)."""

    steps: int = _f(40, ge=0)  # full-model steps, after the head-only ones (paper: 30k VAR, 100k LlamaGen)
    head_only_steps: int = _f(10, ge=0)  # head trained with the backbone frozen first (paper VAR: 300k; LlamaGen 0)
    lr: float = _f(2e-4, gt=0.0)  # peak learning rate (paper: 2e-4 VAR, 1e-4 LlamaGen)
    betas: tuple[float, float] = _f((0.9, 0.95), ge=0.0, lt=1.0)  # Adam betas
    weight_decay: float = _f(0.0, ge=0.0)
    warmup_steps: int = _f(0, ge=0)  # linear LR warm-up from 0
    grad_clip: float = _f(1.0, ge=0.0)  # max global grad norm; 0 = off
    t_min: float = _f(0.02, gt=0.0, lt=1.0)  # t ~ U(t_min, 1): keeps the closed-form score finite
    batch_size: int = _f(8, gt=0)  # sequences per rank per micro-step (global = x workers x grad_accum)


@dataclass(frozen=True)
class Stage2Config:
    """Main distillation: generator CSD steps and guidance FCS steps (docs/method.md §8-§10; Tab.11)."""

    # Optional start (not in the paper; docs/method.md §12.2): generator steps regressing onto the teacher's
    # PF-ODE noise -> token pairs before the alternation; 0 = off. The regression has its own LR and warm-up; the
    # generator's AdamW moments and LR clock restart when CSD begins (regression and CSD gradients differ in scale)
    ode_init_steps: int = _f(0, ge=0)
    ode_init_lr: float = _f(3e-4, gt=0.0)  # end LR of the regression's warm-up (from lr_start)
    ode_init_warmup_steps: int = _f(20, ge=0)  # its linear warm-up, in regression steps
    # Heun steps of the teacher PF-ODE per AR step for those pairs: the map must have converged, not only its code
    # frequencies (8 steps agree with 128 on 49% of the digits LlamaGen teacher's tokens, 16 on 94%; see
    # dd2dist.method.ode_init.teacher_ode_agreement, which the first block of pairs logs)
    ode_steps: int = _f(32, ge=1)
    ode_pairs_per_call: int = _f(8, ge=1)  # regression steps whose pairs one teacher sampler call makes
    # DMD-style anchor during CSD: the generator loss adds this weight times the regression loss on PF-ODE pairs,
    # the CSD step then drawing its noise from those pairs (0 = CSD alone, the paper)
    regression_weight: float = _f(0.0, ge=0.0)
    generator_steps: int = _f(20, ge=0)  # generator (CSD) updates (paper d16: 8k before alignment)
    guidance_per_generator: int = _f(2, ge=1)  # K guidance updates per generator update (paper: 5; toy best: 2)
    generator_lr: float = _f(2e-4, gt=0.0)  # end LR of the generator warm-up (paper: 2e-4 d16/d20, 1e-4 LG-L)
    guidance_lr: float = _f(2e-4, gt=0.0)  # end LR of the guidance net (paper: 2e-4)
    lr_start: float = _f(1e-6, ge=0.0)  # start LR of the linear warm-up (paper: 1e-6)
    warmup_guidance_steps: int = _f(10, ge=0)  # generator LR warm-up length in *guidance* iterations (paper 40k)
    betas: tuple[float, float] = _f((0.9, 0.95), ge=0.0, lt=1.0)  # Adam betas, both networks
    weight_decay: float = _f(0.0, ge=0.0)
    grad_clip: float = _f(1.0, ge=0.0)  # max global grad norm per network; 0 = off
    fcs_samples: int = _f(4, ge=1)  # m (t, eps) draws per position per guidance backbone pass (docs/method.md §8)
    csd_loss: Literal["sid", "dmd"] = "sid"  # SiD divergence, or the DMD/KL-gradient fallback
    csd_alpha: float = _f(1.0, ge=0.0)  # SiD alpha
    csd_t_min: float = _f(0.02, gt=0.0, lt=1.0)  # CSD t ~ U(csd_t_min, csd_t_max)
    csd_t_max: float = _f(0.96, gt=0.0, lt=1.0)
    # What the teacher is conditioned on in CSD: the generator's continuous prefix (docs/method.md §5.4) or
    # its nearest codes ("snap"): the teacher is only trained on codes, and quantised samples are what is scored
    teacher_prefix: Literal["continuous", "snap"] = "continuous"
    # What ψ's backbone is teacher-forced on (FCS and CSD): sg(q) itself, or its nearest codes ("snap": ψ then
    # models the generator given the quantised prefix, the quantity the quantised joint is made of)
    guidance_prefix: Literal["continuous", "snap"] = "continuous"
    # What ψ's velocity is built on (docs/method.md §12.11). "none": ψ's head predicts the whole velocity (the
    # paper). "teacher": ψ = the teacher's closed-form velocity on the same prefix (as CSD conditions the teacher,
    # ``teacher_prefix``) plus ψ's MLP head as a learned correction, its output layer zeroed when stage 2 starts.
    # ψ then fits only where the generator differs from the teacher, so a generator at the teacher meets an
    # exactly zero CSD gradient instead of ψ's own fitting error
    guidance_base: Literal["none", "teacher"] = "none"
    fcs_t_min: float = _f(0.02, gt=0.0, lt=1.0)  # FCS t ~ U(fcs_t_min, 1)
    # A categorical generator's stage-2 loss per position (dd2dist.method.losses.categorical_divergence): the KL from
    # the teacher's target to the generator's conditional, or the mean of both KL directions, which keeps a generator
    # that cannot yet reach the teacher from spreading its mass over codes the teacher finds unlikely
    categorical_divergence: Literal["forward", "symmetric"] = "forward"
    # The LR of the generator's neighbour-picks head (student.neighbour_picks) as a multiple of generator_lr: it
    # starts from fresh weights beside a backbone copied from the teacher, and at the backbone's LR it is still far
    # from trained when stage 2 ends (docs/method.md §12.16)
    neighbour_picks_lr_scale: float = _f(1.0, gt=0.0)
    ema_max: float = _f(0.9999, ge=0.0, le=1.0)  # generator EMA decay cap
    ema_warmup: Literal["progressive", "none"] = "progressive"  # progressive: min(ema_max, (n+1)/(n+ema_rampup))
    ema_rampup: float = _f(10.0, gt=1.0)  # progressive: (n+1)/(n+ema_rampup); paper 10; smaller = longer horizon
    # further EMA decay caps tracked beside ema_max on the same trajectory (same warm-up and rampup), each exported
    # as generator_ema<cap>.safetensors: one run compares EMA horizons paired, free of run-to-run noise
    ema_compare: tuple[float, ...] = _f((), ge=0.0, le=1.0)
    batch_size: int = _f(8, gt=0)  # sequences per rank per micro-step (global = x workers x grad_accum)

    def __post_init__(self) -> None:
        if self.csd_t_min >= self.csd_t_max:
            raise ConfigError("csd_t_min", f"must be < csd_t_max ({self.csd_t_max}), got {self.csd_t_min}")
        if len(set(self.ema_compare)) != len(self.ema_compare):
            raise ConfigError("ema_compare", f"lists a decay cap twice: {list(self.ema_compare)}")


@dataclass(frozen=True)
class AlignmentConfig:
    """Optional performance alignment inside stage 2 (docs/method.md §10.5; paper: VAR-d16/d20 only)."""

    enabled: bool = False
    after_generator_steps: int = _f(10, ge=0)  # generator steps before the alignment starts (paper d16: 8k)
    guidance_only_steps: int = _f(10, ge=0)  # guidance-only steps on the EMA-overwritten generator (paper: 8k)
    guidance_per_generator_after: int = _f(2, ge=1)  # K after the alignment (paper: 2)
    generator_steps_after: int = _f(10, ge=0)  # generator steps after the alignment (paper d16: 7.5k)


@dataclass(frozen=True)
class EngineConfig:
    """How each network is executed (ZeRO stage per network; memory per stage in docs/scaling.md §3)."""

    kind: Literal["torch", "deepspeed"] = "torch"  # plain torch (single process / DDP-free) or DeepSpeed engines
    precision: Literal["fp32", "bf16"] = "fp32"  # training precision (fp16 is refused by DeepSpeed on CPU)
    zero_stage_teacher: int = _f(3, ge=0, le=3)  # frozen teacher, forward only
    zero_stage_generator: int = _f(0, ge=0, le=3)
    zero_stage_guidance: int = _f(0, ge=0, le=3)
    grad_accum: int = _f(1, ge=1)  # micro-steps per optimizer step
    activation_checkpointing: bool = False  # recompute backbone activations in backward


@dataclass(frozen=True)
class LaunchConfig:
    """Ray Train placement, fault tolerance and checkpoint retention."""

    num_workers: int = _f(1, ge=1)  # training processes (ranks)
    cpus_per_worker: float = _f(1.0, gt=0.0)
    use_gpu: bool = False  # one GPU per worker
    max_failures: int = _f(0, ge=0)  # Ray FailureConfig: restarts from the last checkpoint before giving up
    checkpoint_every: int = _f(50, ge=1)  # optimizer steps between checkpoints
    num_to_keep: int = _f(2, ge=1)  # checkpoints kept under <output>/checkpoints (and by Ray)
    storage_path: str | None = None  # Ray run storage; None = <output_dir>/ray (URIs such as s3:// kept as is)
    ray_address: str | None = None  # existing cluster; the RAY_ADDRESS env var wins; None = start a local Ray
    object_store_mb: int = _f(256, ge=75)  # object store of a locally started Ray (Ray's minimum is 75 MB)
    # the run lock of another host's run is taken over after this long without heartbeat (docs/run_safety.md)
    lock_stale_s: float = _f(300.0, gt=0.0)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking from rank 0."""

    # stored configs of earlier runs still carry it (evaluation and --eval-only load them)
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "progress_bar": "rank 0 prints progress lines every tracking.progress_every_s seconds"}

    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the local SQLite store (dd2dist.tracking)
    experiment: str = "dd2"  # MLflow experiment name
    log_every: int = _f(10, ge=1)  # optimizer steps between metric logs
    sample_grid_every: int = _f(0, ge=0)  # steps between logged sample grids; 0 = only at the end
    # rank 0's progress (dd2dist.launch.progress): a line per phase every this many seconds and when the phase is
    # done (a bar instead where stdout is a terminal); 0 = none
    progress_every_s: float = _f(30.0, ge=0)


@dataclass(frozen=True)
class EvalConfig:
    """FID / IS / precision-recall and sampling settings of an evaluation."""

    num_samples: int = _f(64, ge=1)  # images generated for the metrics (paper: 50k)
    batch_size: int = _f(16, ge=1)
    inception_weights: str | None = _f(None, path="file")  # local InceptionV3 weights (not downloadable here)
    reference_npz: str | None = _f(None, path="file")  # reference statistics / activations of the real data
    refine_steps: tuple[int, ...] = _f((), ge=2)  # extra teacher-refined k-step evaluations (1-step always runs)


@dataclass(frozen=True)
class CompactHeadConfig:
    """A smaller sampling head regressed onto the trained generator's head (:mod:`dd2dist.nets.compact_head`):
    fitted after training, exported beside the generator, evaluated and timed as ``one_step_compact``."""

    enabled: bool = False  # fit it after stage 2 (jobs/distill.py, jobs/demo.py); jobs/compact_head.py any time
    width: int = _f(64, gt=0)  # MLP width
    depth: int = _f(1, ge=0)  # AdaLN residual blocks; 0 = the final AdaLN layer alone
    rank: int = _f(0, ge=0)  # rank of the AdaLN modulation projection; 0 = full rank
    steps: int = _f(2000, ge=0)  # Adam steps of the regression
    lr: float = _f(2e-3, gt=0.0)  # peak LR (5% warm-up, cosine to 0)
    batch_rows: int = _f(4096, gt=0)  # token rows per step
    pool_sequences: int = _f(4096, gt=0)  # fresh generator inputs per pool (their backbone pass is the cost)
    refresh_every: int = _f(500, gt=0)  # steps between pool redraws


@dataclass(frozen=True)
class ExperimentConfig:
    """Root of a run's configuration: what to run, on which teacher, with which hyper-parameters, where."""

    name: str = "dd2"  # run name: MLflow run name and default output directory runs/<name>
    seed: int = _f(0, ge=0)  # base seed; per-rank / per-step streams derive from it
    output_dir: str | None = None  # run directory; None = runs/<name>; stored absolute (relative = to the CWD)
    stages: tuple[Stage, ...] = ("stage1", "stage2")  # stages this run executes, in order
    teacher: TeacherConfig = _section(TeacherConfig)
    student: StudentConfig = _section(StudentConfig)
    data: DataConfig = _section(DataConfig)
    stage0: Stage0Config = _section(Stage0Config)  # LlamaGen input adaptation (jobs/adapt_llamagen.py)
    stage1: Stage1Config = _section(Stage1Config)
    stage2: Stage2Config = _section(Stage2Config)
    alignment: AlignmentConfig = _section(AlignmentConfig)
    engine: EngineConfig = _section(EngineConfig)
    launch: LaunchConfig = _section(LaunchConfig)
    tracking: TrackingConfig = _section(TrackingConfig)
    eval: EvalConfig = _section(EvalConfig)
    compact_head: CompactHeadConfig = _section(CompactHeadConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.name):
            raise ConfigError("name", f"must be letters, digits, '_', '.', '-' (used in paths), got {self.name!r}")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError("stages", f"lists a stage twice: {list(self.stages)}")
        order = [STAGE_ORDER.index(s) for s in self.stages]
        if order != sorted(order):
            raise ConfigError("stages", f"must be in the order {', '.join(STAGE_ORDER)}; got {list(self.stages)}")
        if "alignment" in self.stages and not self.alignment.enabled:
            raise ConfigError("alignment.enabled", "must be true when stages include 'alignment'")
        if self.student.generator_output == "categorical":
            self._check_categorical_generator()
        elif self.stage2.categorical_divergence != "forward":
            raise ConfigError("stage2.categorical_divergence", "needs student.generator_output: categorical (a "
                                                               "continuous generator is trained by CSD)")
        self._check_neighbour_picks()
        # Derived defaults are resolved here, once, so that every worker and the dumped config agree on them.
        output_dir = os.path.abspath(os.path.expanduser(self.output_dir or os.path.join("runs", self.name)))
        object.__setattr__(self, "output_dir", output_dir)
        storage = self.launch.storage_path or os.path.join(output_dir, "ray")
        if not _is_uri(storage):
            storage = os.path.abspath(os.path.expanduser(storage))
        if storage != self.launch.storage_path:
            object.__setattr__(self, "launch", replace(self.launch, storage_path=storage))

    def _check_categorical_generator(self) -> None:
        """A categorical generator is trained by the exact KL alone: what only a continuous generator or a guidance
        network uses is refused rather than silently ignored."""
        why = "with student.generator_output: categorical"
        if not self.student.posterior_head:
            raise ConfigError("student.posterior_head", f"must be true {why} (its code logits give the outputs)")
        if self.student.generator_snap != 0.0:
            raise ConfigError("student.generator_snap", f"must be 0 {why} (the outputs are codes already)")
        if self.stage2.ode_init_steps != 0:
            raise ConfigError("stage2.ode_init_steps", f"must be 0 {why} (the PF-ODE regression fits continuous "
                                                       "outputs; the exact KL needs no start)")
        if self.stage2.regression_weight != 0.0:
            raise ConfigError("stage2.regression_weight", f"must be 0 {why} (no PF-ODE anchor)")
        if "alignment" in self.stages:
            raise ConfigError("stages", f"cannot include 'alignment' {why} (there is no guidance network to align)")
        if self.compact_head.enabled:
            raise ConfigError("compact_head.enabled", f"must be false {why} (the generator samples without its MLP "
                                                      "head, so there is no head to compact)")

    def _check_neighbour_picks(self) -> None:
        if self.student.neighbour_picks == "none":
            if self.stage2.neighbour_picks_lr_scale != 1.0:
                raise ConfigError("stage2.neighbour_picks_lr_scale", "needs student.neighbour_picks (the generator "
                                                                      "has no neighbour-picks head)")
            return
        if self.student.generator_output != "categorical":
            raise ConfigError("student.neighbour_picks", "needs student.generator_output: categorical (a continuous "
                                                         "generator picks no codes to read)")
        raster = self.student.neighbour_picks != "parents"
        if raster and self.teacher.family != "llamagen":
            raise ConfigError("student.neighbour_picks", f"{self.student.neighbour_picks!r} is for raster (LlamaGen) "
                                                         f"teachers, not {self.teacher.family!r}: a VAR scale's tokens "
                                                         "are drawn together (use 'parents')")
        if not raster and self.teacher.family != "var":
            raise ConfigError("student.neighbour_picks", f"'parents' is for next-scale (VAR) teachers, not "
                                                         f"{self.teacher.family!r} (use 'left' or 'left_up')")

    @property
    def text_conditional(self) -> bool:
        """Whether the teacher is conditioned on captions (a LlamaGen teacher with ``caption_dim > 0``)."""
        return self.teacher.family == "llamagen" and self.teacher.arch.caption_dim > 0

    def caption_source(self) -> str:
        """Where a text-conditional run reads its captions: ``data.captions``, else ``data.shards``.

        Checked by the launch before any worker starts and by the trainer, not when the config loads: teacher
        files and recipes that leave the data to the command line must still load."""
        source = self.data.captions or self.data.shards
        if not source:
            raise ConfigError("data.captions", "a text-conditional teacher (teacher.llamagen.caption_dim > 0) draws "
                                               "the captions of stage 2 and of online sampling from data: set "
                                               "data.captions, or data.shards (text-conditional token shards)")
        return source
