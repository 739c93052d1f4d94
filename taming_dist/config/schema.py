"""The typed configuration tree.

Every section is a dataclass; `load.py` builds them from YAML and rejects unknown keys.
Model sections (`EncoderDecoderConfig`, `QuantizerConfig`, `VQModelConfig`, `GPTConfig`,
`ConditionConfig`, `TransformerModelConfig`) are also what an exported `config.json` holds, so a
model can be rebuilt with no training code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# ----------------------------------------------------------------------------------------------
# Models


@dataclass
class EncoderDecoderConfig:
    """The original `ddconfig` of taming's Encoder/Decoder (names kept for import)."""

    double_z: bool = False
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0

    def validate(self) -> None:
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor "
                f"2**(len(ch_mult)-1) = {2 ** (len(self.ch_mult) - 1)}; change resolution or ch_mult"
            )
        for c in [self.ch * m for m in self.ch_mult] + [self.ch]:
            if c % 32:
                raise ValueError(f"channel count {c} (ch x ch_mult) is not divisible by GroupNorm's 32 groups")


@dataclass
class QuantizerConfig:
    """kind: vq (VectorQuantizer2), ema (EMA codebook), gumbel (GumbelQuantize), l2 (factorised,
    l2-normalised low-dimensional lookup as in ViT-VQGAN / LlamaGen), fsq (finite scalar
    quantization, implicit codebook of prod(levels) codes), lfq (lookup-free quantization, implicit
    codebook of 2**codebook_dim codes). For fsq and lfq, n_embed and embed_dim must name the
    implicit codebook's size and width (checked here), so stage 2 and the tools read them as usual."""

    kind: str = "vq"
    n_embed: int = 1024
    embed_dim: int = 256
    beta: float = 0.25
    legacy: bool = True  # original's beta placement (on the codebook term); see docs/taming-compat.md
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    codebook_dim: int = 8  # l2: dimension of the lookup space; lfq: bits per code
    gumbel_tau: float = 1.0
    gumbel_straight_through: bool = True  # gumbel only: hard one-hot in training (the original's default)
    kl_weight: float = 5e-4
    # vq/ema only: restart codes whose EMA usage, relative to a uniform assignment (1.0 = an
    # average code), falls below this (0 = never)
    dead_code_threshold: float = 0.0
    # vq/ema/l2: at the first training step, set the codebook to the k-means centres (kmeans_iters
    # Lloyd iterations) of that global batch's encoder outputs
    kmeans_init: bool = False
    kmeans_iters: int = 10
    # codebook usage over the last usage_window training tokens of all ranks (logged as window_usage)
    usage_window: int = 65536
    levels: list[int] = field(default_factory=list)  # fsq only: levels per channel, e.g. [8, 5, 5, 5]
    # lfq only: loss = beta * commitment + entropy_weight * (per-sample entropy - diversity_gamma *
    # codebook entropy), the soft assignments at entropy_temperature, computed in groups of at most
    # entropy_group_bits bits (2**bits probabilities per vector and group)
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0
    entropy_temperature: float = 0.01
    entropy_group_bits: int = 10

    def validate(self) -> None:
        # The one place the quantizer kind and the options each kind allows are checked
        # (models/quantize.py's factory only maps the kind to its class).
        if self.kind not in ("vq", "ema", "gumbel", "l2", "fsq", "lfq"):
            raise ValueError(f"quantizer.kind {self.kind!r} is not one of vq, ema, gumbel, l2, fsq, lfq")
        if self.dead_code_threshold > 0 and self.kind not in ("vq", "ema"):
            raise ValueError(
                f"quantizer.dead_code_threshold={self.dead_code_threshold} is only supported by kinds vq and ema, "
                f"not {self.kind!r}; set it to 0"
            )
        if self.kmeans_init and self.kind not in ("vq", "ema", "l2"):
            why = ("its codes are chosen by a learned projection, not by distance" if self.kind == "gumbel" else
                   "its codebook is a fixed implicit grid with nothing to initialise")
            raise ValueError(f"quantizer.kmeans_init is supported by kinds vq, ema and l2, not {self.kind} ({why}); "
                             "set it to false")
        if self.levels and self.kind != "fsq":
            raise ValueError(f"quantizer.levels {self.levels} is only used by kind fsq, not {self.kind}; remove it")
        if self.kind == "fsq":
            if not self.levels or min(self.levels) < 2:
                raise ValueError(f"quantizer.kind=fsq needs quantizer.levels, a list of at least 2 levels per channel "
                                 f"(e.g. [8, 5, 5, 5]), got {self.levels}")
            size = 1
            for level in self.levels:
                size *= level
            self._check_implicit(size, len(self.levels), f"prod(levels {self.levels})", "len(levels)")
        if self.kind == "lfq":
            if not 1 <= self.codebook_dim <= 30 or self.entropy_group_bits < 1 or self.entropy_temperature <= 0:
                raise ValueError(f"quantizer.kind=lfq needs 1 <= codebook_dim <= 30 (got {self.codebook_dim}), "
                                 f"entropy_group_bits >= 1 (got {self.entropy_group_bits}) and entropy_temperature "
                                 f"> 0 (got {self.entropy_temperature})")
            self._check_implicit(2**self.codebook_dim, self.codebook_dim, f"2**codebook_dim ({self.codebook_dim})",
                                 "codebook_dim")
        if self.kmeans_iters < 1 or self.usage_window < 1:
            raise ValueError(f"quantizer.kmeans_iters ({self.kmeans_iters}) and quantizer.usage_window "
                             f"({self.usage_window}) must be at least 1")

    def _check_implicit(self, size: int, width: int, size_of: str, width_of: str) -> None:
        if self.n_embed != size or self.embed_dim != width:
            raise ValueError(f"quantizer.kind={self.kind}: the implicit codebook has {size_of} = {size} codes of width "
                             f"{width_of} = {width}, but n_embed={self.n_embed} and embed_dim={self.embed_dim}; set "
                             f"quantizer.n_embed={size} quantizer.embed_dim={width}")


@dataclass
class VQModelConfig:
    ddconfig: EncoderDecoderConfig = field(default_factory=EncoderDecoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def validate(self) -> None:
        self.ddconfig.validate()
        self.quantizer.validate()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig.ch_mult) - 1)


@dataclass
class GPTConfig:
    """minGPT as used by Net2NetTransformer, plus optional cross-attention."""

    vocab_size: int = 1024
    block_size: int = 256
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0
    cross_attention: bool = False  # add a cross-attention sub-block to every block
    context_dim: int = 0  # width of the conditioning sequence for cross-attention
    # A learned Linear(context_dim, n_embd) in front of cross-attention (K/V then read n_embd), and
    # a learned null context token for classifier-free guidance dropout. Set by the condition
    # (condition.kind=text sets both; see models/conditions.py), recorded with the model.
    context_proj: bool = False
    null_context: bool = False

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"gpt.n_embd {self.n_embd} is not divisible by gpt.n_head {self.n_head}")
        if self.cross_attention and self.context_dim <= 0:
            raise ValueError("gpt.cross_attention needs gpt.context_dim > 0 (width of the context sequence)")


CONDITION_KINDS = ("none", "class", "tokens", "context", "text")


@dataclass
class ConditionConfig:
    """kind: none (one SOS token), class (label as a token), tokens (codes of a second VQModel,
    e.g. depth or segmentation), context (a sequence attended to through cross-attention), text
    (a caption's features from a frozen text encoder, precomputed by `extract-codes --text-encoder`,
    attended to through cross-attention with a padding mask). models/conditions.py holds one class
    per kind."""

    kind: str = "none"
    sos_token: int = 0
    n_classes: int = 0
    class_dropout: float = 0.0  # probability of replacing the label by the null class (for CFG)
    cond_vqgan: Optional[VQModelConfig] = None  # kind=tokens
    cond_ckpt: str = ""  # kind=tokens: weights of the conditioning VQModel
    context_len: int = 0  # kind=context: length of the context; kind=text: the most text tokens
    text_encoder: str = ""  # kind=text: name of the encoder the features came from (recorded, checked)

    def validate(self) -> None:
        # Each kind's own checks live with its class (models/conditions.py, which also names the
        # classes of these kinds); here only the name.
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"condition.kind {self.kind!r} is not one of {', '.join(CONDITION_KINDS)}")


@dataclass
class TransformerModelConfig:
    gpt: GPTConfig = field(default_factory=GPTConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    first_stage: VQModelConfig = field(default_factory=VQModelConfig)
    pkeep: float = 1.0  # fraction of input image tokens kept (rest replaced by random codes)

    def validate(self) -> None:
        self.gpt.validate()
        self.condition.validate()
        self.first_stage.validate()
        if self.gpt.vocab_size < self.first_stage.quantizer.n_embed:
            raise ValueError(
                f"gpt.vocab_size {self.gpt.vocab_size} is smaller than the first stage's "
                f"n_embed {self.first_stage.quantizer.n_embed}"
            )


# ----------------------------------------------------------------------------------------------
# Losses


@dataclass
class DiscriminatorConfig:
    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    # batch (the original; per-rank statistics under data parallelism) | actnorm | none (no
    # normalisation: per-sample, so identical results at any world size)
    norm: str = "batch"

    def validate(self) -> None:
        if self.norm not in ("batch", "actnorm", "none"):
            raise ValueError(f"discriminator.norm {self.norm!r} is not one of batch, actnorm, none")


@dataclass
class VQLossConfig:
    """VQLPIPSWithDiscriminator's options."""

    disc_start: int = 0
    codebook_weight: float = 1.0
    pixel_weight: float = 1.0
    # The pixel term: l1, the original's |x - xrec|; or l2, the squared error (x - xrec)^2, which
    # PSNR measures (LlamaGen's VQ loss uses it). On the demo's data, vqgan-tiny at 600 steps: l2
    # 20.25 and 19.33 dB held-out PSNR against l1's 18.04 and 17.93 (two seeds; README, the demo).
    pixel_loss: str = "l1"  # l1 | l2
    perceptual_weight: float = 1.0
    disc_weight: float = 1.0
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla | non_saturating
    adaptive_weight: bool = True
    # LPIPS backbone: a local VGG16 file (torchvision's vgg16-397923af.pth, an original taming VQGAN
    # .ckpt or an imported loss.safetensors); "" looks in $TORCH_HOME/hub/checkpoints. `random`
    # builds a random backbone (tests only).
    lpips_vgg_path: str = ""
    lpips_backbone: str = "pretrained"  # pretrained | random
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # LeCAM regularisation of the discriminator (Tseng et al. 2021), 0 = off; the EMA of the mean
    # real and fake logits it pulls towards decays by lecam_ema_decay per step
    lecam_weight: float = 0.0
    lecam_ema_decay: float = 0.999

    def validate(self) -> None:
        if self.disc_loss not in ("hinge", "vanilla", "non_saturating"):
            raise ValueError(f"loss.disc_loss {self.disc_loss!r} is not one of hinge, vanilla, non_saturating")
        if self.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"loss.pixel_loss {self.pixel_loss!r} is not one of l1 (absolute error, the original's) "
                             "and l2 (squared error)")
        if self.lecam_weight < 0 or not 0.0 <= self.lecam_ema_decay < 1.0:
            raise ValueError(f"loss.lecam_weight ({self.lecam_weight}) must be >= 0 and loss.lecam_ema_decay "
                             f"({self.lecam_ema_decay}) in [0, 1)")
        if self.lpips_backbone not in ("pretrained", "random"):
            raise ValueError(f"loss.lpips_backbone {self.lpips_backbone!r} is not one of pretrained, random")
        self.discriminator.validate()


# ----------------------------------------------------------------------------------------------
# Data, engine, training


@dataclass
class DataConfig:
    """kind: synthetic (the built-in dataset, written as shards on first use), shards
    (webdataset tars, `path` is a folder with a manifest or a brace pattern), codes (stage-2 token
    shards from `extract-codes`)."""

    kind: str = "synthetic"
    path: str = ""
    size: int = 32  # image side after crop/resize
    random_crop: bool = False
    hflip: bool = True
    mode: str = "resampled"  # resampled | epoch
    shuffle_buffer: int = 1000
    num_workers: int = 0
    max_corrupt_fraction: float = 0.01
    synthetic_samples: int = 4096
    synthetic_classes: int = 12
    split: str = "train"  # synthetic only: train | heldout (other seeds, the same classes)

    def validate(self) -> None:
        if self.kind not in ("synthetic", "shards", "codes"):
            raise ValueError(f"data.kind {self.kind!r} is not one of synthetic, shards, codes")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"data.split {self.split!r} is not one of train, heldout")
        if self.split != "train" and self.kind != "synthetic":
            raise ValueError(f"data.split={self.split} selects a split of the built-in data (data.kind=synthetic); "
                             f"for data.kind={self.kind} point data.path at the held-out shards instead")
        if self.mode not in ("resampled", "epoch"):
            raise ValueError(f"data.mode {self.mode!r} is not one of resampled, epoch")
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"data.kind={self.kind} needs data.path (a shard folder or pattern)")


@dataclass
class EngineConfig:
    kind: str = "single"  # single | ddp | fsdp | deepspeed
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; eager or aot_eager capture the graphs without codegen
    channels_last: bool = False
    # FSDP2: ranks per shard group. 0 = all ranks (full sharding); e.g. 8 = shard within a node of 8
    # GPUs and replicate across nodes (hybrid sharding, HSDP), so parameter all-gathers stay on NVLink.
    fsdp_shard_size: int = 0
    # FSDP2: what `fully_shard` groups. blocks = each declared block, then the root (all-gathers one
    # block at a time: the memory of large models); root = the whole module as one group (three
    # collectives per step instead of three per block: faster for small models where latency, not
    # memory, is what a step spends, as the demo's 1M-parameter units on CPU ranks).
    fsdp_wrap: str = "blocks"  # blocks | root
    # DeepSpeed: ZeRO-Offload of the optimizer state + step (ZeRO-2/3) and of the parameters (ZeRO-3)
    offload_optimizer: str = "none"  # none | cpu
    offload_params: str = "none"  # none | cpu
    deepspeed_config: str = ""  # a DeepSpeed JSON merged over the generated config (its keys win)
    # CUDA only: TF32 tensor cores for fp32 matmuls/convolutions, and cuDNN's autotuner (the conv
    # stage's input shapes are fixed, so tuning once pays off)
    tf32: bool = True
    cudnn_benchmark: bool = True
    # Seconds a collective may wait before it fails (gloo raises; NCCL's watchdog aborts the
    # communicator and ends the process), so a rank that hangs or dies cannot hold the other ranks'
    # GPUs for long. The steady-state value applies from the second step on; start-up (process
    # group, model build, checkpoint load, the first step's compilation) and checkpoint / export
    # writes get the longer one.
    collective_timeout_s: int = 300
    startup_timeout_s: int = 1800
    # Before the rendezvous, ranks other than 0 must reach the master (MASTER_ADDR:MASTER_PORT) within
    # this many seconds, and every rank must resolve its name; else they fail at once with the host,
    # the port and where they came from, instead of retrying for startup_timeout_s. 0 = no connection test.
    master_connect_timeout_s: int = 60

    def validate(self) -> None:
        if self.kind not in ("single", "ddp", "fsdp", "deepspeed"):
            raise ValueError(f"engine.kind {self.kind!r} is not one of single, ddp, fsdp, deepspeed")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage {self.zero_stage} is not one of 1, 2, 3")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"engine.precision {self.precision!r} is not one of fp32, bf16, fp16")
        if self.fsdp_shard_size < 0:
            raise ValueError(f"engine.fsdp_shard_size {self.fsdp_shard_size} must be >= 0 (0 = shard over all ranks)")
        for key in ("offload_optimizer", "offload_params"):
            if getattr(self, key) not in ("none", "cpu"):
                raise ValueError(f"engine.{key} {getattr(self, key)!r} is not one of none, cpu")
        if self.kind != "deepspeed" and (self.offload_optimizer != "none" or self.offload_params != "none"
                                         or self.deepspeed_config):
            raise ValueError(f"engine.offload_optimizer / offload_params / deepspeed_config are DeepSpeed settings; "
                             f"engine.kind is {self.kind}")
        if self.kind == "deepspeed" and self.offload_optimizer != "none" and self.zero_stage == 1:
            raise ValueError("engine.offload_optimizer=cpu needs engine.zero_stage 2 or 3 (ZeRO-Offload)")
        if self.kind == "deepspeed" and self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("engine.offload_params=cpu needs engine.zero_stage=3 (parameters are only partitioned there)")
        if self.fsdp_shard_size and self.kind != "fsdp":
            raise ValueError(f"engine.fsdp_shard_size is an FSDP2 setting; engine.kind is {self.kind}")
        if self.fsdp_wrap not in ("blocks", "root"):
            raise ValueError(f"engine.fsdp_wrap {self.fsdp_wrap!r} is not one of blocks (each block its own "
                             "FSDP2 group, then the root), root (the whole module as one group)")
        if self.fsdp_wrap != "blocks" and self.kind != "fsdp":
            raise ValueError(f"engine.fsdp_wrap is an FSDP2 setting; engine.kind is {self.kind}")
        for key in ("collective_timeout_s", "startup_timeout_s"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} {getattr(self, key)} must be at least 1 second")
        if self.master_connect_timeout_s < 0:
            raise ValueError(f"engine.master_connect_timeout_s {self.master_connect_timeout_s} must be >= 0 "
                             "(0 = no connection test)")


@dataclass
class OptimConfig:
    lr: float = 4.5e-6
    scale_lr: bool = False  # multiply lr by global batch size (the original's convention)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # global norm; 0 = off


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 8
    # Per-rank batch of one forward/backward. Unset (the default): global_batch_size / data-parallel
    # size, split into gradient-accumulation micro-steps when that exceeds max_micro_batch_size.
    # Set: used as given (global_batch_size must be a multiple of it x data-parallel size).
    micro_batch_size: Optional[int] = None
    max_micro_batch_size: Optional[int] = None  # per-device memory limit for the derived micro batch
    seed: int = 0
    log_every: int = 10
    image_every: int = 500
    ckpt_every: int = 500
    # Also a checkpoint every this many minutes of wall clock (0 = off): rank 0's clock, shared in
    # the step's fused all-reduce, so every rank saves at the same step.
    ckpt_every_min: float = 0.0
    keep_last: int = 3
    # Checkpoints staged to host memory and written by a background thread (DCP's async_save):
    # training stalls only for the copy. Not with engine.kind=deepspeed (its own files are written
    # synchronously by save_checkpoint).
    async_checkpoint: bool = False
    ema_decay: float = 0.0  # 0 = no EMA
    max_bad_steps: int = 5  # halt after this many non-finite steps in a row
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "taming_dist"
    progress: bool = True

    def validate(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode {self.wandb_mode!r} is not one of offline, online, disabled")


@dataclass
class RunConfig:
    """A training run: `stage` picks the task (vqgan or transformer)."""

    stage: str = "vqgan"
    name: str = "run"
    out_dir: str = "runs"
    init_from: str = ""
    vqgan: VQModelConfig = field(default_factory=VQModelConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)
    transformer: TransformerModelConfig = field(default_factory=TransformerModelConfig)
    first_stage_ckpt: str = ""  # stage=transformer: trained VQGAN weights (file or run folder)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        if self.stage not in ("vqgan", "transformer"):
            raise ValueError(f"stage {self.stage!r} is not one of vqgan, transformer")
        if self.stage == "vqgan":
            self.vqgan.validate()
            self.loss.validate()
        else:
            self.transformer.validate()
        self.data.validate()
        self.engine.validate()
        self.logging.validate()
        if self.stage == "vqgan" and self.loss.discriminator.norm == "actnorm" and self.engine.kind in ("fsdp", "deepspeed"):
            # ActNorm's data-dependent init copies batch statistics into its parameters inside forward;
            # FSDP2 writes them into a transient unsharded copy and DeepSpeed's fp32 master weights
            # overwrite them at the first step, so the init would be silently lost.
            raise ValueError(
                f"loss.discriminator.norm=actnorm initialises parameters inside forward, which "
                f"engine.kind={self.engine.kind} would lose (sharded parameters, fp32 master weights); use "
                "loss.discriminator.norm=batch or none, or engine.kind=ddp"
            )
        t = self.train
        if t.async_checkpoint and self.engine.kind == "deepspeed":
            # DeepSpeed writes its model and optimizer partitions with its own synchronous
            # save_checkpoint; its asynchronous writers (Nebula, the decoupled/fast checkpoint
            # engines) are not what DCP's async_save gives the torch engines.
            raise ValueError("train.async_checkpoint=true is not supported with engine.kind=deepspeed (DeepSpeed "
                             "writes its checkpoint files synchronously with its own save_checkpoint); set "
                             "train.async_checkpoint=false, or use engine.kind=fsdp, ddp or single")
        for key in ("global_batch_size", "micro_batch_size", "max_micro_batch_size"):
            if getattr(t, key) is not None and getattr(t, key) < 1:
                raise ValueError(f"train.{key} {getattr(t, key)} must be at least 1")
        if t.ckpt_every_min < 0:
            raise ValueError(f"train.ckpt_every_min {t.ckpt_every_min} must be >= 0 (0 = off)")
        if t.micro_batch_size is not None and t.global_batch_size % t.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size {t.global_batch_size} is not divisible by "
                f"train.micro_batch_size {t.micro_batch_size}"
            )
        if t.micro_batch_size is not None and t.max_micro_batch_size is not None \
                and t.micro_batch_size > t.max_micro_batch_size:
            raise ValueError(f"train.micro_batch_size {t.micro_batch_size} exceeds train.max_micro_batch_size "
                             f"{t.max_micro_batch_size}: set one of them")


def batch_layout(train: TrainConfig, dp_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation micro-steps) of `train` on `dp_size`
    data-parallel ranks, so that micro x steps x dp_size = global_batch_size.

    An explicit train.micro_batch_size is used as given. Otherwise the per-rank share of the global
    batch is one micro batch, or, above train.max_micro_batch_size, the fewest equal micro-steps
    that bring it under the limit (the step count divides the share, so every micro-step is full).
    """
    g = train.global_batch_size
    if train.micro_batch_size is not None:
        per_step = train.micro_batch_size * dp_size
        if g % per_step:
            raise ValueError(
                f"train.global_batch_size {g} is not divisible by train.micro_batch_size "
                f"{train.micro_batch_size} x data-parallel size {dp_size}: leave train.micro_batch_size unset "
                f"to derive it from the global batch, or set it so that global = micro x {dp_size} x accumulation")
        return train.micro_batch_size, g // per_step
    if g % dp_size:
        raise ValueError(f"train.global_batch_size {g} is not divisible by the data-parallel size {dp_size}: "
                         f"use a global batch that is a multiple of the number of ranks")
    share = g // dp_size
    limit = train.max_micro_batch_size or share
    steps = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= limit)
    return share // steps, steps
