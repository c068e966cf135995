"""Typed recipes: one YAML per task sets values; these classes say what each value means.

A recipe file holds the full-size recipe at the top level and named ``profiles`` (``tiny``,
``full``, ...) that override parts of it. Loading applies, in order: the file, the profile,
then ``--set dotted.key=value`` overrides; the result is validated once, strictly (unknown
keys are errors that name the key and suggest close valid ones).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:  # the loaders import numpy, pyarrow and PIL: only when a recipe is checked
    from data_loaders.autonomous import AutonomousSettings
    from data_loaders.recsys import RecsysSettings
    from data_loaders.retinopathy import RetinopathySettings


class ConfigError(Exception):
    """A recipe mistake a user can make; the message is one line naming the key."""


class Section(BaseModel):
    # extra="forbid": a typo in a recipe must fail loudly, not train with a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataSection(Section):
    """A task's data section. The rules on what `prepare` reads live once, in the loader's settings
    type (`data_loaders.<task>`, callable without a recipe); a recipe that breaks one fails to load."""

    def settings(self) -> Any:
        """The loader's settings built from this section (each task's section says which type)."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _loader_rules(self) -> DataSection:
        from data_loaders.errors import DataError

        try:
            self.settings()
        except DataError as err:
            raise ValueError(str(err)) from None
        return self


class RetinopathyData(DataSection):
    source: str = "synthetic"
    """Where images come from: `synthetic` (the fundus generator), or an importer: `eyepacs`, `aptos`, `auto` (detected)."""
    import_path: str | None = None
    """Folder holding an EyePACS (`trainLabels.csv`) or APTOS (`train.csv`) download; importers only."""
    root: str = "data/retinopathy"
    """Folder of the Parquet shards and `manifest.json` (created by `deepfleet prepare`)."""
    num_images: int = Field(20000, ge=0)
    """Synthetic: images to generate (both eyes of num_images/2 patients); importers: at most this many (0: all)."""
    image_size: int = Field(299, ge=16, le=2048)
    """Side of the square image the model sees (299 for InceptionV3, 512 for ResNet-50)."""
    rows_per_shard: int = 2048
    """Rows per Parquet shard (>= 1)."""
    val_fraction: float = 0.1
    """Share of patients in the validation split (>= 0; with test_fraction, below 1)."""
    test_fraction: float = 0.1
    """Share of patients in the test split (>= 0)."""
    label_noise: float = 0.05
    """Synthetic only: share of labels moved to a neighbouring grade, as graders disagree (0-1)."""
    on_bad_image: str = "skip"
    """An image that does not decode: `skip` it and count it in the manifest, or `fail` with its name."""
    augment: bool = True
    """Random flips, small rotations and colour jitter on the training split."""
    seed: int = 0
    """Seed of generation and of the patient split."""

    def settings(self) -> RetinopathySettings:
        """What `data_loaders.retinopathy.prepare` takes; building it checks the loader's rules."""
        from data_loaders.retinopathy import RetinopathySettings

        return RetinopathySettings(**self.model_dump(exclude={"augment"}))


class RetinopathyModel(Section):
    name: Literal["retinopathy"] = "retinopathy"
    """Registry name of the architecture."""
    flavour: str = "full"
    """Registry flavour: `tiny` (ResNet-10, CPU), `full` (InceptionV3 299 px) or `resnet50` (512 px)."""
    backbone: Literal["inception_v3", "resnet50", "resnet10"] | None = None
    """Overrides the flavour's backbone."""
    pretrained: str | None = None
    """Local path of a backbone state dict (.pt/.pth/.safetensors); None starts from random weights."""
    freeze: Literal["none", "early", "all"] = "none"
    """Backbone layers kept fixed: none, the stem and first stages, or the whole backbone."""
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    """Dropout before and after the hidden layer of the head."""
    hidden: int = Field(512, ge=1)
    """Width of the head's hidden layer."""

    def build_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name", "flavour"}, exclude_none=True)


class AutonomousData(DataSection):
    source: str = "synthetic"
    """Where rigs come from: `synthetic` (the 8-camera generator), or `rig` (a rig folder, layout in the README)."""
    import_path: str | None = None
    """Rig folder (`<sample_id>/cam0..7.png, depth0..7.png, annotations.json`); source rig only."""
    root: str = "data/autonomous"
    """Folder of the Parquet shards and `manifest.json` (created by `deepfleet prepare`)."""
    num_samples: int = Field(20000, ge=0)
    """Synthetic: rigs to generate; rig folders: at most this many (0: all)."""
    image_height: int = Field(256, ge=16, le=2048)
    """Height of every camera image the model sees."""
    image_width: int = Field(448, ge=16, le=4096)
    """Width of every camera image the model sees."""
    rows_per_shard: int = 512
    """Rigs per Parquet shard (>= 1)."""
    val_fraction: float = 0.1
    """Share of rigs in the validation split (>= 0; with test_fraction, below 1)."""
    test_fraction: float = 0.1
    """Share of rigs in the test split (>= 0)."""
    max_boxes: int = 16
    """Most boxes kept per camera (the largest ones); the model needs at least as many object queries (>= 1)."""
    num_lanes: int = 4
    """Lane-line slots per camera (lines from left to right; >= 1)."""
    lane_points: int = 20
    """Points per lane, evenly spaced along its visible part (>= 2)."""
    on_bad_sample: str = "skip"
    """A rig that breaks the layout (camera count, sizes, boxes): `skip` and count it, or `fail` naming it."""
    augment: bool = True
    """Photometric jitter per camera on the training split (geometry untouched)."""
    seed: int = 0
    """Seed of generation and of the split."""

    def settings(self) -> AutonomousSettings:
        """What `data_loaders.autonomous.prepare` takes; building it checks the loader's rules."""
        from data_loaders.autonomous import AutonomousSettings

        fields = self.model_dump(exclude={"augment", "image_height", "image_width"})
        return AutonomousSettings(**fields, image_size=(self.image_height, self.image_width))


class AutonomousModel(Section):
    name: Literal["autonomous"] = "autonomous"
    """Registry name of the architecture."""
    flavour: str = "full"
    """Registry flavour: `tiny` (small CNN, CPU), `full` (ResNet-50, d_model 2048) or `convnext`."""
    backbone: Literal["tiny", "resnet50", "convnext"] | None = None
    """Overrides the flavour's per-camera backbone (convnext is built from a transformers config)."""
    separate_backbones: bool = False
    """One backbone per camera, as in the seed (8x the backbone parameters), instead of one shared."""
    d_model: int | None = Field(None, ge=8)
    """Width of the fusion transformer (flavour default: 64 tiny, 2048 full)."""
    heads: int | None = Field(None, ge=1)
    """Attention heads of the fusion transformer."""
    fusion_layers: int | None = Field(None, ge=1)
    """Transformer encoder layers fusing all cameras' tokens."""
    decoder_layers: int | None = Field(None, ge=1)
    """Decoder layers of the object and lane queries."""
    ff_dim: int | None = Field(None, ge=1)
    """Feed-forward width of the transformer layers."""
    queries: int | None = Field(None, ge=1)
    """Object queries per camera (at least data.max_boxes)."""
    depth_width: int | None = Field(None, ge=8)
    """Channels at the top of the depth decoder."""

    def build_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name", "flavour"}, exclude_none=True)


class AutonomousLoss(Section):
    """Multi-task loss weights; the Hungarian matching costs use the same class/L1/GIoU weights."""

    box_class: float = Field(1.0, ge=0)
    """Cross-entropy of the object classes (matched queries) and of "no object" (the others)."""
    no_object: float = Field(0.1, ge=0)
    """Relative weight of the "no object" class in that cross-entropy (most queries are empty)."""
    box_l1: float = Field(5.0, ge=0)
    """L1 distance of matched boxes (cx, cy, w, h normalised)."""
    box_giou: float = Field(2.0, ge=0)
    """Generalised-IoU loss of matched boxes."""
    aux: bool = True
    """Apply the box losses after every decoder layer too (faster convergence, as in DETR)."""
    lane_points: float = Field(5.0, ge=0)
    """L1 distance of the points of lanes that exist."""
    lane_exists: float = Field(1.0, ge=0)
    """Binary cross-entropy of the lane-exists score."""
    depth: float = Field(1.0, ge=0)
    """L1 distance of log depth over pixels with depth."""


class RecsysData(DataSection):
    source: str = "synthetic"
    """Where sessions come from: `synthetic` (the MSSD-shaped generator), or `mssd` (the MSSD CSV importer)."""
    import_path: str | None = None
    """Folder holding an MSSD download (`track_features/*.csv`, `training_set/*.csv`); source mssd only."""
    root: str = "data/recsys"
    """Folder of the Parquet shards, `tracks.parquet` and `manifest.json` (created by `deepfleet prepare`)."""
    num_tracks: int = 100_000
    """Synthetic: tracks in the catalogue (10% released after the train period: the cold-start tracks; >= 10)."""
    num_users: int = 20_000
    """Synthetic: hidden listeners behind the sessions (MSSD logs have no user column; >= 1)."""
    num_sessions: int = 200_000
    """Synthetic: listening sessions of 10-20 tracks each (>= 1)."""
    num_days: int = 60
    """Synthetic: days the sessions span; splits are by date (train first, then val, then test; at least 3)."""
    cold_fraction: float = 0.1
    """Synthetic: share of tracks released after the train period (never seen in training; 0 to below 1)."""
    history_len: int = 10
    """Earlier events of the session the model sees before each candidate (the most recent ones; >= 1)."""
    negatives_per_event: int = 2
    """Sampled tracks per training query, as label-0 rows beside the real one (>= 0)."""
    eval_negatives: int = 19
    """Sampled tracks per validation/test query: each query is ranked in a list of 1 + this many (>= 1)."""
    n_mels: int = 16
    """Synthetic: mel bands of each track's spectrogram-like audio array (>= 1)."""
    frames: int = 32
    """Synthetic: time frames of each track's audio array (>= 1)."""
    rows_per_shard: int = 50_000
    """Rows (query, candidate pairs) per Parquet shard (>= 1)."""
    val_fraction: float = 0.15
    """Share of days (after the train days) in the validation split (> 0; with test_fraction, below 1)."""
    test_fraction: float = 0.15
    """Share of days (the last ones) in the test split (> 0)."""
    on_bad_row: str = "fail"
    """Importer: a log row that breaks the layout: `fail` with its file and line, or `skip` (drop its session)."""
    seed: int = 0
    """Seed of generation and of negative sampling."""

    def settings(self) -> RecsysSettings:
        """What `data_loaders.recsys.prepare` takes; building it checks the loader's rules."""
        from data_loaders.recsys import RecsysSettings

        return RecsysSettings(**self.model_dump())


class RecsysModel(Section):
    name: Literal["recsys", "mf"] = "recsys"
    """Registry name: `recsys` (the hybrid recommender) or `mf` (matrix factorisation)."""
    flavour: str = "full"
    """Registry flavour: `tiny` (CPU, minutes) or `full` (a 4M-track table, 2-layer GRU, hidden 256)."""
    num_tracks: int | None = Field(None, ge=2)
    """Rows of the track-embedding table (index 0 is padding); None: the catalogue's size. Must be at
    least the catalogue's; the full flavour reserves room for millions of tracks."""
    embedding_dim: int | None = Field(None, ge=1)
    """Width of the track embeddings (MF: the factor size); None: the flavour's (32 tiny, 128 full)."""
    hidden: int | None = Field(None, ge=8)
    """Width of the history encoder, audio CNN, MLPs and attention (hybrid only)."""
    encoder: Literal["gru", "transformer"] | None = None
    """History encoder (hybrid only): a GRU, or a transformer encoder (flavour default: gru)."""
    encoder_layers: int | None = Field(None, ge=1)
    """Layers of the history encoder (hybrid only)."""
    heads: int | None = Field(None, ge=1)
    """Attention heads of the candidate-over-history attention and the transformer (hybrid only)."""
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """Dropout in the MLPs, attention and head (hybrid only)."""
    id_dropout: float | None = Field(None, ge=0.0, le=1.0)
    """Share of training rows whose candidate embedding is zeroed, so the model learns to score a track
    by its audio and features alone, as it must for cold-start tracks (hybrid only)."""

    def build_kwargs(self) -> dict[str, Any]:
        """Registry keyword arguments set by the recipe (num_tracks is checked against the data first)."""
        kw = self.model_dump(exclude={"name", "flavour", "num_tracks"}, exclude_none=True)
        if self.name == "mf":  # MF has factors only
            return {k: v for k, v in kw.items() if k == "embedding_dim"}
        return kw


class RecsysBaselines(Section):
    """What the recommender is compared with in summary.json (popularity ranking always)."""

    mf: bool = True
    """Also train matrix factorisation with the same engine on the same data, as the sibling run
    `<run>-mf` (its own summary.json); skipped when the recipe's model already is mf."""
    mf_epochs: int | None = Field(None, ge=1)
    """Epochs of the MF run (None: train.epochs)."""
    mf_lr: float | None = Field(None, gt=0)
    """Peak learning rate of the MF run (None: train.lr)."""
    mf_embedding_dim: int | None = Field(None, ge=1)
    """Factor size of the MF run (None: model.embedding_dim, else the flavour's)."""


class TrainSection(Section):
    epochs: int = Field(10, ge=1)
    """Passes over the training split."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps in total (across resumes), whatever `epochs` says."""
    batch_size: int = Field(32, ge=1)
    """Micro-batch per worker; the global batch is batch_size x grad_accum x workers."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated before each optimizer step."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Rows per validation batch (each worker reads its own share of the split); no gradients
    are kept, so it can well exceed batch_size. None: batch_size."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the cosine decay as a share of the peak learning rate."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Global gradient-norm clipping (0 turns it off)."""
    aux_loss_weight: float = Field(0.4, ge=0.0)
    """Weight of InceptionV3's auxiliary classifier loss during training."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 data parallel, 1 optimizer states, 2 + gradients, 3 + parameters."""
    offload: Literal["none", "cpu"] = "none"
    """ZeRO-Offload: optimizer states (and parameters at stage 3) live in host memory and AdamW
    steps on the host (DeepSpeed's CPU Adam); on CPU workers it runs the same code path."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype (weights, gradients and optimizer states stay fp32): auto is bf16 on GPUs that
    support it and on CPUs with native bf16 for the tasks it speeds up there, fp32 otherwise."""
    seed: int = 0
    """Seed of initialisation and augmentation."""
    log_every: int = Field(10, ge=1)
    """Optimizer steps between progress lines (and W&B points)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Also checkpoint every this many optimizer steps inside an epoch (checkpoints always close an epoch)."""
    trace_batches: bool = False
    """Record the sample ids of every step in metrics.jsonl (to check the maths against plain PyTorch)."""


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL between them; otherwise CPU workers over gloo."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs each worker reserves (its torch thread count on CPU)."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """PACK fills as few nodes as possible (fastest collectives); SPREAD puts workers on different nodes when it can. Both re-place the workers on the nodes left after a node is lost."""


class RunSection(Section):
    output_dir: str = "runs"
    """Where run directories live; a shared filesystem on multi-node clusters."""
    name: str | None = None
    """Run name (default `<task>-<profile>`); starting a run whose name exists resumes it."""
    max_failures: int = Field(2, ge=-1)
    """Worker-group failures Ray Train recovers from (from the last checkpoint); -1 is unlimited."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept on storage."""
    allow_changes: bool = False
    """Let a run started again go on with another model, task or data (refused by default: its
    checkpoints hold the old model)."""

    @model_validator(mode="after")
    def _local_output(self) -> RunSection:
        from data_loaders.errors import DataError, check_local

        try:
            check_local(output_dir=self.output_dir)
        except DataError as err:
            raise ValueError(str(err)) from None
        return self


class WandbSection(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes files under the run directory (`wandb sync` uploads them); online needs WANDB_API_KEY."""
    project: str = "deepfleet"
    """W&B project."""
    entity: str | None = None
    """W&B team or user."""
    group: str | None = None
    """W&B group (Tune sweeps group their trials)."""


SAMPLERS = (
    "uniform",
    "quniform",
    "loguniform",
    "qloguniform",
    "randint",
    "qrandint",
    "lograndint",
    "randn",
    "choice",
)


class TuneScheduler(Section):
    name: Literal["asha", "fifo"] = "asha"
    """Trial scheduler: ASHA stops trials behind their peers at each rung; fifo runs every trial to the end."""
    grace_period: int = Field(1, ge=1)
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(3.0, gt=1)
    """ASHA: only the best 1/reduction_factor of the trials reaching a rung go on to the next."""


class TuneSearch(Section):
    name: Literal["random", "optuna"] = "random"
    """Search algorithm: random sampling of the space, or Optuna's TPE (learns from finished trials)."""
    seed: int = 0
    """Seed of the sampler: the same seed draws the same trials."""


class TuneSection(Section):
    """Hyperparameter search with Ray Tune; every trial is a full Ray Train + DeepSpeed run."""

    metric: str | None = None
    """Validation metric that ranks trials (one the task reports, or val_loss); None: the task's first."""
    mode: Literal["max", "min"] | None = None
    """Whether a higher or lower metric is better; None: the metric's own direction."""
    num_samples: int = Field(8, ge=1)
    """Trials to run."""
    space: dict[str, dict[str, list | Any]] = {}
    """Search space: `dotted.key: {sampler: args}` with Ray Tune's samplers (uniform, quniform,
    loguniform, qloguniform, randint, qrandint, lograndint, randn: their arguments as a list;
    choice: the list of values). A profile's space replaces the recipe's."""
    trial: dict[str, Any] = {}
    """Fixed overrides of every trial (`dotted.key: value`), e.g. a shorter `train.epochs`."""
    include_defaults: bool = True
    """Run the recipe's own values of the searched keys as the first trial, so the sweep measures
    what it gains over them."""
    scheduler: TuneScheduler = TuneScheduler()
    search: TuneSearch = TuneSearch()
    max_concurrent: int | None = Field(None, ge=1)
    """Trials running at once; None: as many as the cluster's CPUs and GPUs hold (each trial needs
    scaling.num_workers workers plus a CPU for its data pipeline)."""
    gpus_per_trial: float | None = Field(None, ge=0)
    """Override the GPUs a trial is counted as needing (None: one per worker when scaling.use_gpu)."""

    @model_validator(mode="after")
    def _space(self) -> TuneSection:
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(
                    f"space.{key}: one sampler expected, as {{loguniform: [1.0e-4, 1.0e-2]}} "
                    f"(samplers: {', '.join(SAMPLERS)}; got {list(spec)})"
                )
            sampler, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ValueError(f"space.{key}: {sampler} takes a list of arguments (got {args!r})")
            if sampler != "choice":
                try:  # YAML reads 1e-4 (no dot) as a string
                    spec[sampler] = [float(a) if isinstance(a, str) else a for a in args]
                except ValueError:
                    raise ValueError(f"space.{key}: {sampler} takes numbers (got {args!r})") from None
        return self


class RegistryGate(Section):
    """What a model must show on the test split before it becomes `production`."""

    thresholds: dict[str, float] = {}
    """Per metric the least (or, for metrics where lower is better, the most) a model may score."""
    beat_production: bool = True
    """The model must also score at least as well as the current production model on the ranking metric."""
    metric: str | None = None
    """Metric compared with production (None: tune.metric, else the task's first)."""


class RegistrySection(Section):
    uri: str = "registry"
    """Where registered models live: a local folder or any pyarrow filesystem URI (s3://, gs://,
    hdfs://); laid out as `<uri>/<task>/<version>/`."""
    gate: RegistryGate = RegistryGate()
    auto_promote: bool = False
    """After a sweep, promote its registered candidate to production when it passes the gate."""


class RecipeBase(Section):
    if TYPE_CHECKING:  # each task's recipe declares it as a Literal field (a field here would reorder dumps)
        task: str

    profile: str | None = None
    """Profile the recipe was resolved with (set by the loader)."""
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    wandb: WandbSection = WandbSection()
    tune: TuneSection = TuneSection()
    registry: RegistrySection = RegistrySection()

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.task}-{self.profile or 'default'}"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir).expanduser().resolve() / self.run_name

    def config_hash(self) -> str:
        """Hash of what changes the trained model (not where it is written or logged)."""
        payload = self.model_dump(mode="json", exclude={"run", "wandb", "profile", "tune", "registry"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class RetinopathyRecipe(RecipeBase):
    task: Literal["retinopathy"] = "retinopathy"
    data: RetinopathyData = RetinopathyData()
    model: RetinopathyModel = RetinopathyModel()


class AutonomousRecipe(RecipeBase):
    task: Literal["autonomous"] = "autonomous"
    data: AutonomousData = AutonomousData()
    model: AutonomousModel = AutonomousModel()
    loss: AutonomousLoss = AutonomousLoss()


class RecsysRecipe(RecipeBase):
    task: Literal["recsys"] = "recsys"
    data: RecsysData = RecsysData()
    model: RecsysModel = RecsysModel()
    baselines: RecsysBaselines = RecsysBaselines()


def recipe_class(task: str) -> type[RecipeBase] | None:
    """The recipe type of a registered task (jobs.tasks: deepfleet's own and plugins'), or None."""
    from jobs import tasks  # jobs.tasks.builtin imports this module's recipe types

    return tasks.spec(task).recipe if task in tasks.names() else None


# ---------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    # YAML parsing gives `3` -> int, `1e-3` -> float, `null` -> None, `[1,2]` -> list.
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def _takes_text(cls: type[BaseModel], keys: list[str]) -> bool:
    """Whether the field at dotted `keys` holds text only (str, or str or None): YAML reads `off`,
    `yes` or `1e3` as other types, which such a field would refuse."""
    for i, key in enumerate(keys):
        field = cls.model_fields.get(key)
        if field is None:
            return False
        ann = field.annotation
        if i < len(keys) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            cls = ann
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    return ann is str or (union and set(typing.get_args(ann)) == {str, type(None)})


def _valid_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in cls.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


def _error_line(err: ValidationError, cls: type[BaseModel], source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, _valid_keys(cls), n=3, cutoff=0.5)
        leaf = loc.rsplit(".", 1)[-1]
        close = close or difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in _valid_keys(cls)])
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"{source}: unknown config key '{loc}'{hint}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    return f"{source}: {loc or 'recipe'}: {first['msg']}{shown}{more}"


def load_recipe(
    path: str | Path, profile: str | None = None, overrides: list[str] | None = None
) -> RecipeBase:
    """Read a recipe file, apply a profile and ``--set`` overrides, validate strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections")
    profiles = raw.pop("profiles", {}) or {}
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"{path}: no profile '{profile}' (profiles: {', '.join(profiles) or 'none'})")
        chosen = profiles[profile] or {}
        if "space" in (chosen.get("tune") or {}):  # a profile's search space replaces, not extends
            raw.get("tune", {}).pop("space", None)
        raw = _deep_merge(raw, chosen)
        raw["profile"] = profile
    for item in overrides or []:
        keys, value = _parse_set(item)
        cls = recipe_class(str(raw.get("task", "")))
        if cls is not None and not isinstance(value, str | None) and _takes_text(cls, keys):
            value = item.split("=", 1)[1].strip()  # `--set run.name=off` names a run "off", not False
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
    task = raw.get("task")
    cls = recipe_class(str(task))
    if cls is None:
        from jobs import tasks

        raise ConfigError(f"{path}: 'task' must be one of {', '.join(tasks.names())} (got {task!r})")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_error_line(e, cls, str(path))) from None


def recipe_from_options(
    path: str | Path,
    profile: str | None = None,
    sets: list[str] | None = None,
    output_dir: str | None = None,
    name: str | None = None,
) -> RecipeBase:
    """The recipe a command's options describe: `load_recipe` with `--output-dir` and `--name`
    applied as the `run.output_dir` and `run.name` overrides they stand for."""
    overrides = list(sets or [])
    if output_dir:
        overrides.append(f"run.output_dir={output_dir}")
    if name:
        overrides.append(f"run.name={name}")
    return load_recipe(path, profile, overrides)


def with_values(recipe: RecipeBase, values: dict[str, Any], source: str) -> RecipeBase:
    """A copy of the recipe with `dotted.key: value` pairs set, validated strictly; a key the
    recipe does not have, or a value it refuses, is named in one line."""
    cls = type(recipe)
    raw = recipe.model_dump(mode="json")
    valid = _valid_keys(cls)
    for key, value in values.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: '{key}' is not a field of the {recipe.task} recipe{hint}")
        node = raw
        for k in key.split(".")[:-1]:
            node = node[k]
        node[key.rsplit(".", 1)[-1]] = value
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_error_line(e, cls, source)) from None


def recipe_from_dict(data: dict) -> RecipeBase:
    """Rebuild a recipe from `model_dump()` output (on workers, from a run directory)."""
    cls = recipe_class(data["task"])
    if cls is None:
        raise ConfigError(f"task '{data['task']}' is not registered here (is its package installed?)")
    return cls.model_validate(data)


def save_recipe(recipe: RecipeBase, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
