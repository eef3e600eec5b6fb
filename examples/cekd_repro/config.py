"""Run configuration of the reproduction: every option of a run, the presets, and their validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .device import run_device

METHODS = ("baseline", "mixup", "cutmix", "snapmix", "cekd", "dml", "one", "ffl", "pcl", "mcl", "kd", "ccd")
ONLINE = ("cekd", "dml", "one", "ffl", "pcl", "mcl")  # the methods that train N members together, over --mix
OFFLINE = ("kd", "ccd")  # one student distilled from a finished run (--teacher), over --mix
TEACHERS = ("baseline", "mixup", "cutmix", "snapmix", "cekd")  # the runs a --teacher may be: one model or CEKD's
MIXES = ("cutmix", "snapmix", "mixup", "none")
# the transfer proxy's source tasks (dataset name -> what its classes share with the target's; cekd_repro.synthetic)
SOURCE_TASKS = {"synthetic-source": "near", "synthetic-colours": "colours", "synthetic-distant": "distant"}
# drawn in memory: the target task and the source tasks
SYNTHETIC = ("synthetic", *SOURCE_TASKS)
CEKD_OPTIONS = ("temperature", "alpha", "beta", "combine", "no_cross", "no_ensemble")
ONLINE_OPTIONS = ("mix", "members", "rampup_epochs", "branches_from")  # every online method's
MEAN_BUFFERS = ("own", "averaged", "copied")  # TemporalMean's rules for the buffers
MIXING_OPTIONS = ("mix_alpha", "mix_p", "same_on_batch", "mix_off_epoch")


@dataclass
class RunConfig:
    """Everything that defines a run; saved as config.json in the run dir."""

    method: str = "cekd"
    mix: str = "cutmix"  # the online and offline methods' mixing: cutmix | snapmix | mixup | none, or a list
    teacher: str | None = None  # kd, ccd: the run dir of the finished run that teaches (its weights only)
    dataset: str = "synthetic"
    data_root: str | None = None
    classes: int = 12  # synthetic only
    train_per_class: int = 80
    test_per_class: int = 40
    data_seed: int | None = None  # synthetic only: the seed its images are drawn from (None: the run's --seed)
    image_size: int = 64  # synthetic: drawn size; real data: crop size
    max_shift: int = 4  # synthetic: the training images' augmentation, a random translation of up to this many px
    resize: int = 512  # real data: images warped to resize x resize before cropping
    arch: str = "resnet18"  # comma-separated: one per cekd member, or one for all
    members: int = 2
    branches_from: str | None = None  # online methods (cekd too): the members are branches of a trunk from this stage
    pretrained: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    head_lr: float | None = None  # None: same as lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad: float | None = None  # max global L2 norm of the gradient; None: no clipping
    schedule: str = "onecycle"  # onecycle | multistep
    milestones: list[int] = field(default_factory=lambda: [80, 150, 180])
    mix_alpha: float | None = 1.0  # None (the fine-tuning presets'): each mixing's own, PAPER_MIX_ALPHA
    mix_p: float = 0.5
    same_on_batch: bool = False
    switch_prob: float | None = None  # a --mix list: the others' share (first: 1 - it); None: equal shares
    mix_off_epoch: int | None = None  # no mixing after this many epochs (timm's --mixup-off-epoch)
    temperature: float = 3.0
    alpha: float = 1.0
    beta: float = 1.0
    combine: str = "mean"
    rampup_epochs: int = 5
    mean_buffers: str = "own"  # pcl: its temporal means' BatchNorm statistics (TemporalMean's buffers rule)
    dml_ramp: bool = False  # dml: ramp its distillation as the others (runs saved before DML followed its paper)
    nce_k: int = 16384  # mcl: negatives per sample of its contrastive term (MCL-OKD's)
    pcl_legacy: bool = False  # pcl as trained up to 94be06b: every mean on every view, a trunk's branches on one
    no_cross: bool = False
    no_ensemble: bool = False
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = None  # file datasets: where decoded images are kept (None: ~/.cache/cekd-losses)
    no_cache: bool = False  # file datasets: decode every image every epoch instead
    eval_every: int = 1  # evaluate on the test set every this many epochs (and always after the last)
    visualize_cams: int = 0
    keep: str = "checkpoint"  # at the end: "checkpoint" (resumable) or "weights" (weights.pt only)
    quiet: bool = False

    def applies(self, name: str) -> bool:
        """Whether the option ``name`` takes part in this run (config.json records only those)."""
        synthetic = self.dataset in SYNTHETIC
        if name in ("classes", "train_per_class", "test_per_class", "data_seed", "max_shift"):
            return synthetic
        if name in ("data_root", "resize", "cache_dir", "no_cache"):
            return not synthetic
        if name in CEKD_OPTIONS:
            return self.method == "cekd"
        if name == "rampup_epochs":  # DML and MCL-OKD do not ramp (their code), but for DML runs saved when it did
            return self.method in ONLINE and (self.method not in ("dml", "mcl") or self.dml_ramp)
        if name == "dml_ramp":
            return self.method == "dml" and self.dml_ramp
        if name == "pcl_legacy":
            return self.method == "pcl" and self.pcl_legacy
        if name == "mix":
            return self.method in ONLINE or self.method in OFFLINE
        if name == "teacher":
            return self.method in OFFLINE
        if name in ONLINE_OPTIONS:
            return self.method in ONLINE
        if name in MIXING_OPTIONS:
            return bool(self.mixer_methods)
        if name == "switch_prob":
            return len(self.mixer_methods) > 1
        if name == "milestones":
            return self.schedule == "multistep"
        if name == "mean_buffers":
            return self.method == "pcl"
        if name == "nce_k":
            return self.method == "mcl"
        return True

    def saved(self) -> dict:
        """The options that apply to this run, as written to config.json (a resume fills the rest
        with their defaults, which this run never reads)."""
        return {name: value for name, value in asdict(self).items() if self.applies(name)}

    def archs(self) -> list[str]:
        names = self.arch.split(",")
        count = self.members if self.method in ONLINE else 1
        if len(names) == 1:
            return names * count
        if len(names) != count:
            raise ValueError(f"--arch gives {len(names)} architectures for {count} members")
        return names

    @property
    def mixer_methods(self) -> tuple[str, ...]:
        """The MixingAugmenter methods this run chooses among: the method's own (mixup, cutmix, snapmix), an online
        method's ``mix`` (the --mix flag, a comma-separated list), or none for the baseline and ``--mix none``."""
        if self.method in ONLINE or self.method in OFFLINE:
            return () if self.mix == "none" else tuple(self.mix.split(","))
        return () if self.method == "baseline" else (self.method,)

    @property
    def mixer_alpha(self) -> float | list[float]:
        """The mixer's Beta parameter: ``mix_alpha``, or where it is None each mixing's own
        (:data:`PAPER_MIX_ALPHA`)."""
        if self.mix_alpha is not None:
            return self.mix_alpha
        return [PAPER_MIX_ALPHA[m] for m in self.mixer_methods]

    @property
    def method_p(self) -> list[float] | None:
        """A --mix list's probabilities: the first ``1 - switch_prob``, the others ``switch_prob`` shared (timm's
        switch for two), or None (equal)."""
        methods = self.mixer_methods
        if len(methods) < 2 or self.switch_prob is None:
            return None
        return [1.0 - self.switch_prob] + [self.switch_prob / (len(methods) - 1)] * (len(methods) - 1)

    def with_mixing_alpha(self) -> RunConfig:
        """This run with its mixing's own Beta parameter (:data:`PAPER_MIX_ALPHA`) where ``mix_alpha`` is None and
        it mixes with one method: a table's base under a fine-tuning preset leaves it None, so that each row mixes
        with its own (a --mix list keeps None: each method its own, :attr:`mixer_alpha`)."""
        if self.mix_alpha is not None or len(self.mixer_methods) != 1:
            return self
        return replace(self, mix_alpha=PAPER_MIX_ALPHA[self.mixer_methods[0]])

    def validate(self) -> None:
        """Raise ValueError naming the flag for any value a run cannot use."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--image-size", self.image_size),
            ("--epochs", self.epochs),
            ("--members", self.members),
            ("--resize", self.resize),
            ("--classes", self.classes),
            ("--train-per-class", self.train_per_class),
            ("--test-per-class", self.test_per_class),
            ("--eval-every", self.eval_every),
            ("--nce-k", self.nce_k),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in (
            ("--workers", self.workers),
            ("--seed", self.seed),
            ("--data-seed", 0 if self.data_seed is None else self.data_seed),
            ("--rampup-epochs", self.rampup_epochs),
        ):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        for flag, value in (
            ("--lr", self.lr),
            ("--head-lr", self.head_lr),
            ("--clip-grad", self.clip_grad),
            ("--mix-alpha", self.mix_alpha),
            ("--temperature", self.temperature),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if any(m < 1 for m in self.milestones) or sorted(set(self.milestones)) != list(self.milestones):
            raise ValueError(f"--milestones must be increasing epochs >= 1, got {' '.join(map(str, self.milestones))}")
        if not 0 <= self.mix_p <= 1:
            raise ValueError(f"--mix-p must be in [0, 1], got {self.mix_p}")
        if self.mean_buffers not in MEAN_BUFFERS:
            raise ValueError(f"--mean-buffers must be one of {', '.join(MEAN_BUFFERS)}, got {self.mean_buffers!r}")
        self._validate_mixing()
        if not 0 <= self.max_shift < self.image_size:
            raise ValueError(f"--max-shift must be in [0, --image-size {self.image_size}), got {self.max_shift}")
        if self.dataset not in SYNTHETIC and self.data_seed is not None:
            raise ValueError(f"--data-seed draws the synthetic sets' images; --dataset {self.dataset} has its own")
        if self.dataset not in SYNTHETIC and self.image_size > self.resize:
            raise ValueError(
                f"--image-size {self.image_size} must be <= --resize {self.resize} (images are cropped "
                "from the resized image)"
            )
        self._validate_online()
        self._validate_offline()
        self.archs()
        run_device(self.device)
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")

    def _validate_mixing(self) -> None:
        """--mix (one mixing, none, or a list of distinct mixings), --switch-prob and --mix-off-epoch."""
        names = self.mix.split(",")
        if self.mix not in MIXES and (len(set(names)) != len(names) or not set(names) <= set(MIXES) - {"none"}):
            raise ValueError(
                f"--mix must be one of {', '.join(MIXES)} or a list of distinct ones (cutmix,mixup), got {self.mix!r}"
            )
        if self.switch_prob is not None:
            if len(self.mixer_methods) < 2:
                raise ValueError("--switch-prob chooses within a --mix list (cutmix,mixup); this run mixes with one")
            if not 0 <= self.switch_prob <= 1:
                raise ValueError(f"--switch-prob must be in [0, 1], got {self.switch_prob}")
        if self.mix_off_epoch is not None:
            if not self.mixer_methods:
                raise ValueError(f"--mix-off-epoch stops the mixing; --method {self.method} here does not mix")
            if not 1 <= self.mix_off_epoch < self.epochs:
                raise ValueError(
                    f"--mix-off-epoch must be in [1, --epochs {self.epochs}) (the epochs mixed before the clean ones), "
                    f"got {self.mix_off_epoch}"
                )

    def _validate_online(self) -> None:
        """The flags of the methods that train N members together (cekd, dml, one, ffl, pcl)."""
        if self.method in ONLINE and self.members < 2:
            raise ValueError(f"--members must be >= 2 for --method {self.method}, got {self.members}")
        if self.branches_from is None:
            return
        if self.method not in ONLINE:
            raise ValueError(f"--branches-from applies to --method {', '.join(ONLINE)}, got --method {self.method}")

    def _validate_offline(self) -> None:
        """kd and ccd: a teacher run dir; CCD pairs each image with its mix."""
        if self.method in OFFLINE and not self.teacher:
            raise ValueError(f"--method {self.method} distils a finished run: give --teacher RUN_DIR")
        if self.method == "ccd" and self.mix == "none":
            raise ValueError("--method ccd pairs each image with its mix: give --mix cutmix, snapmix or mixup")


# The quick presets' recipe: the synthetic set from scratch, one-cycle SGD with clipping, half of the samples mixed
FROM_SCRATCH = {
    "dataset": "synthetic",
    "classes": 12,
    "test_per_class": 40,
    "image_size": 64,
    "batch_size": 64,
    "lr": 0.1,
    "weight_decay": 5e-4,
    "clip_grad": 5.0,
    "schedule": "onecycle",
    "mix_alpha": 1.0,
    "mix_p": 0.5,
    "rampup_epochs": 4,
    "nce_k": 1024,  # mcl: MCL-OKD's 16384 negatives cost 5x a step here, against a training set of a few hundred
}
PRESETS = {
    # The default run: two of timm's test_resnet, a few minutes on 2 CPU cores; docs/example.rst says why.
    "quick": {**FROM_SCRATCH, "arch": "timm:test_resnet", "train_per_class": 30, "epochs": 30},
    # The quick preset until commit 82cf9f1, which the measured tables of docs/measurements.rst name.
    "quick-resnet18": {**FROM_SCRATCH, "arch": "resnet18", "train_per_class": 60, "epochs": 20},
    # The SnapMix code base that the CEKD paper builds on.
    "paper": {
        "arch": "resnet50",
        "resize": 512,
        "image_size": 448,
        "batch_size": 16,
        "epochs": 200,
        "lr": 0.001,
        "head_lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "multistep",
        "milestones": [80, 150, 180],
        "mix_p": 1.0,
        "same_on_batch": True,
        "rampup_epochs": 0,
        "workers": 8,
    },
    # The transfer proxy's target (--transfer): the paper's fine-tuning recipe (lr split 0.001 / 0.01, every
    # batch mixed with one draw, no ramp-up, no clipping) on the synthetic set with few images per class,
    # its 200-epoch schedule scaled to 30 epochs (milestones at 40%, 75% and 90%).
    "transfer": {
        "dataset": "synthetic",
        "classes": 12,
        "train_per_class": 20,
        "test_per_class": 40,
        "image_size": 64,
        "arch": "resnet18",
        "batch_size": 16,
        "epochs": 30,
        "lr": 0.001,
        "head_lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "multistep",
        "milestones": [12, 22, 27],
        "mix_p": 1.0,
        "same_on_batch": True,
        "rampup_epochs": 0,
    },
}
# The cheap transfer proxy: the transfer preset with timm's test_resnet (a ResNet of a few thousand weights per
# stage; one 16-image step at 64 px costs a sixth of resnet18's on a CPU), whose --transfer source is by default
# the colours task (cekd_repro.transfer: its probe stays far below fine-tuning, as in the paper's regime).
PRESETS["transfer-tiny"] = {**PRESETS["transfer"], "arch": "timm:test_resnet"}
# The transfer proxy with room to regularise (docs/measurements.rst, "A target with room to regularise"): resnet18
# fine-tuned from the colours source on 10 images per class for 90 epochs (milestones at 40%, 75% and 90%) fits its
# training images and stays far below them on the test set, where a stronger shift (--max-shift 8) gains on every seed.
PRESETS["transfer-room"] = {**PRESETS["transfer"], "train_per_class": 10, "epochs": 90, "milestones": [36, 68, 81]}
# the presets that fine-tune with the paper's recipe (each mixing takes its own Beta parameter)
FINE_TUNING_PRESETS = ("paper", "transfer", "transfer-tiny", "transfer-room")
# the paper preset's Beta parameter of each mixing, as the SnapMix code base
PAPER_MIX_ALPHA = {"snapmix": 5.0, "cutmix": 3.0, "mixup": 1.0}


def preset_config(preset: str, given: dict) -> RunConfig:
    """The run of ``preset`` with the options ``given`` on the command line; under the paper and transfer presets
    each run (each row of a table) takes its mixing's own Beta parameter unless ``mix_alpha`` is given."""
    config = replace(RunConfig(), **{**PRESETS[preset], **given})
    if preset in FINE_TUNING_PRESETS and "mix_alpha" not in given:
        config = replace(config, mix_alpha=None)  # each run takes its mixing's own (RunConfig.with_mixing_alpha)
    if config.dataset not in SYNTHETIC and not config.data_root:
        raise ValueError(f"--dataset {config.dataset} needs --data-root")
    if "milestones" in given and config.schedule != "multistep":
        raise ValueError(
            f"--milestones applies to the multistep schedule of --preset paper and transfer; --preset {preset} "
            f"uses {config.schedule}"
        )
    return config
