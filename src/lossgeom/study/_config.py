"""The typed study file: a base training config, its sweep, probes and executor.

A study file is YAML read with the training config's safe loader (plain data,
duplicate keys refused) and checked with pydantic; every error names its field
path. :func:`load_study` also expands the sweep and validates every resolved
training config, so nothing starts before the whole study is known to be valid.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lossgeom.train import ConfigError, TrainConfig, load_config
from lossgeom.train._reading import format_errors, read_source

__all__ = [
    "ExecutorConfig",
    "PairsConfig",
    "ProbeAt",
    "ProbeSpec",
    "RunSpec",
    "SlurmConfig",
    "Study",
    "StudyConfig",
    "StudyError",
    "load_study",
]

Int = Annotated[int, Field(strict=True)]
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]


class StudyError(ValueError):
    """An invalid study file or study directory; the message says what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeAt(_Strict):
    """When a probe runs (any combination; the final weights by default).

    Attributes:
        final: at the end of the run (the last step, or where ``stop`` ended it).
        every: at step 0 and every this many steps.
        steps: at these steps.
        train_loss: at the first metrics step whose ``train_loss`` is at most
            this value (resolution: ``metrics.every``).
    """

    final: bool = False
    every: PositiveInt | None = None
    steps: list[Annotated[int, Field(strict=True, ge=0)]] = Field(default_factory=list)
    train_loss: PositiveFloat | None = None

    @model_validator(mode="after")
    def _some(self) -> ProbeAt:
        if not (self.final or self.every or self.steps or self.train_loss):
            raise ValueError(
                "say when the probe runs: 'final', {every: N}, {steps: [...]} or "
                "{train_loss: x}"
            )
        return self


def _at(value: Any) -> Any:
    return {"final": True} if value == "final" else value


class ProbeSpec(_Strict):
    """A measurement of each run's model, by the name of a public function.

    Attributes:
        name: a name of ``lossgeom.study.PROBES`` (e.g. ``eigenvalues``,
            ``trace``, ``density``, ``sharpness``, ``noise_scale``, ``slice_1d``).
        options: its keyword arguments (checked against its signature).
        at: when it runs: ``final`` (default) or a :class:`ProbeAt` mapping.
        key: the name of its columns (default: the name, plus ``_<kind>`` for
            probes with kinds, as in training metrics).
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    at: ProbeAt = Field(default_factory=lambda: ProbeAt(final=True))
    key: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _final(cls, data: Any) -> Any:
        if isinstance(data, dict) and "at" in data:
            data = {**data, "at": _at(data["at"])}
        return data

    @model_validator(mode="after")
    def _known(self) -> ProbeSpec:
        from lossgeom.study._probes import PROBES, check_probe

        check_probe(PROBES, self.name, self.options)
        return self

    @property
    def column(self) -> str:
        """The probe's column name."""
        from lossgeom.study._probes import PROBES, probe_key

        return self.key or probe_key(PROBES, self.name, self.options)


class PairProbeSpec(_Strict):
    """A measurement between the weights of two seeds of one setting.

    Attributes:
        name: ``interpolate`` (the linear path and its barrier), ``connect``
            (a trained curve) or ``align`` (permutation alignment, then the path).
        options: its keyword arguments.
        step: probe the weights of both runs at this step (their checkpoints,
            so the base config must list it in ``checkpoint.steps``); ``None``:
            the final weights.
        key: the name of its columns (default: the name, plus ``_step<N>``
            when ``step`` is set).
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    step: Annotated[int, Field(strict=True, ge=0)] | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _known(self) -> PairProbeSpec:
        from lossgeom.study._probes import PAIR_PROBES, check_probe

        check_probe(PAIR_PROBES, self.name, self.options)
        return self

    @property
    def column(self) -> str:
        """The probe's column name."""
        if self.key:
            return self.key
        return self.name if self.step is None else f"{self.name}_step{self.step}"


class PairsConfig(_Strict):
    """Probes across the seeds of each setting, once all its seeds finished.

    Attributes:
        between: ``all`` pairs of seeds, or ``consecutive`` ones (s0-s1, s1-s2...).
        probes: the pairwise probes.
    """

    between: Literal["all", "consecutive"] = "all"
    probes: list[PairProbeSpec] = Field(default_factory=list)


class StopRule(_Strict):
    """When each run stops.

    Attributes:
        steps: at most this many steps (overrides the base config's ``steps``).
        train_loss: at the first metrics step whose ``train_loss`` is at most this.
    """

    steps: PositiveInt | None = None
    train_loss: PositiveFloat | None = None


class SlurmConfig(_Strict):
    """Settings of the SLURM executor (one array job per batch of runs).

    Attributes:
        partition: the partition (``None``: the cluster's default).
        time_min: wall-time limit of a run, minutes.
        cpus_per_task: CPUs of each run (also its torch threads).
        gpus_per_node: GPUs of each run.
        mem_gb: memory of each run (``None``: the partition's default).
        array_parallelism: at most this many runs of an array at once.
        max_array_size: at most this many runs per array job.
    """

    partition: str | None = None
    time_min: PositiveInt = 60
    cpus_per_task: PositiveInt = 1
    gpus_per_node: Annotated[int, Field(strict=True, ge=0)] = 0
    mem_gb: PositiveFloat | None = None
    array_parallelism: PositiveInt | None = None
    max_array_size: PositiveInt | None = None


class ExecutorConfig(_Strict):
    """Where runs execute.

    Attributes:
        kind: ``local`` (a process pool on this machine) or ``slurm``.
        jobs: runs at once for ``local`` (``None``: the number of cores); each
            run gets ``cores // jobs`` torch threads.
        slurm: settings of the ``slurm`` executor.
    """

    kind: Literal["local", "slurm"] = "local"
    jobs: PositiveInt | None = None
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class StudyConfig(_Strict):
    """A study: a base training config swept over a grid and seeds, probed.

    Attributes:
        name: the study's name.
        base: a training config (see :class:`~lossgeom.train.TrainConfig`); its
            ``seed`` is replaced by each of ``seeds``.
        grid: config paths (``optim.lr``, ``batch_size``,
            ``model.options.skip``) to lists of values; the runs are their
            cartesian product.
        zip: groups of paths whose value lists vary together (equal lengths);
            each group is one axis of the product.
        seeds: the seeds of every setting (distinct).
        stop: when runs stop.
        probes: measurements of each run.
        pairs: measurements across the seeds of each setting.
        executor: where runs execute (does not change results).
    """

    name: str = "study"
    base: dict[str, Any]
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    seeds: list[Int] = Field(default_factory=lambda: [0])
    stop: StopRule = Field(default_factory=StopRule)
    probes: list[ProbeSpec] = Field(default_factory=list)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _sweep(self) -> StudyConfig:
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed (e.g. [0])")
        twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if twice:
            raise ValueError(f"seeds {twice} appear more than once; list each once")
        seen: dict[str, str] = {}
        axes = [("grid", self.grid)] + [(f"zip.{i}", g) for i, g in enumerate(self.zip)]
        for where, group in axes:
            if where != "grid" and not group:
                raise ValueError(f"{where} is empty; remove it or give paths")
            lengths = {len(v) for v in group.values()}
            for path, values in group.items():
                if not values:
                    raise ValueError(
                        f"{where}.{path} has no values; give at least one (a list)"
                    )
                if path in seen:
                    raise ValueError(
                        f"{where}.{path}: the path is also swept in {seen[path]}; "
                        "sweep each path in one place"
                    )
                if path in ("seed", "name"):
                    raise ValueError(
                        f"{where}.{path}: set seeds with 'seeds:'; the name is the "
                        "study's"
                    )
                check_path(path, f"{where}.{path}")
                seen[path] = where
            if where != "grid" and len(lengths) > 1:
                raise ValueError(
                    f"{where}: the value lists vary together and need equal "
                    f"lengths; got {dict((p, len(v)) for p, v in group.items())}"
                )
        columns = [p.column for p in self.probes] + [
            p.column for p in self.pairs.probes
        ]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ValueError(
                f"two probes write the same columns {twice}; give them distinct keys"
            )
        return self


def check_path(path: str, where: str) -> None:
    """Raise ``ValueError`` unless ``path`` names a field of a training config.

    Below a free-form mapping (``model.options``, ``data.options``) any name is
    accepted here; the model's own check then names unknown options.
    """
    model: Any = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            known = sorted(fields)
            above = ".".join(parts[:i]) or "the training config"
            raise ValueError(
                f"{where}: unknown config path {path!r}: {above} has no field "
                f"{part!r}; its fields are {known}"
            )
        inner = _model_of(fields[part].annotation)
        if inner is None:
            if i < len(parts) - 1 and not _is_mapping(fields[part].annotation):
                raise ValueError(
                    f"{where}: unknown config path {path!r}: "
                    f"{'.'.join(parts[: i + 1])} is a value, not a section"
                )
            return
        model = inner


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside an annotation (``X | None`` included)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _is_mapping(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


class RunSpec(BaseModel):
    """One run of a study: a setting and a seed, its config resolved.

    Attributes:
        run_id: content hash of the resolved config (its name left out).
        setting_id: content hash of the resolved config without its seed.
        seed: the seed.
        overrides: the swept paths and their values in this setting.
        config: the resolved training config, as plain values.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    setting_id: str
    seed: int
    overrides: dict[str, Any]
    config: dict[str, Any]


class Study(BaseModel):
    """A validated study: its file, its fingerprint and its runs.

    Attributes:
        config: the study config.
        runs: every run, settings in sweep order, seeds within a setting.
        fingerprint: content hash of the study (its executor left out): two
            files with the same fingerprint are the same study.
        source: where it came from (a path, or ``dict``).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    config: StudyConfig
    runs: list[RunSpec]
    fingerprint: str
    source: str

    def settings(self) -> dict[str, list[RunSpec]]:
        """The runs grouped by setting, in sweep order."""
        out: dict[str, list[RunSpec]] = {}
        for run in self.runs:
            out.setdefault(run.setting_id, []).append(run)
        return out


def content_hash(data: Any, n: int = 16) -> str:
    """A short SHA-256 of plain data in canonical JSON (sorted keys)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _set(config: dict, path: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for path ``a.b.c``, creating sections."""
    *parents, last = path.split(".")
    node = config
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{path}: {part} is {child!r} in base, not a section")
        node = child
    node[last] = copy.deepcopy(value)


def _settings(cfg: StudyConfig) -> list[dict[str, Any]]:
    """The overrides of each setting: the product of the grid axes and zip groups."""
    axes: list[list[dict[str, Any]]] = [
        [{path: v} for v in values] for path, values in cfg.grid.items()
    ]
    for group in cfg.zip:
        n = len(next(iter(group.values())))
        axes.append([{p: vs[i] for p, vs in group.items()} for i in range(n)])
    out = []
    for combo in itertools.product(*axes):
        merged: dict[str, Any] = {}
        for part in combo:
            merged.update(part)
        out.append(merged)
    return out


def _resolve(cfg: StudyConfig, overrides: dict[str, Any], seed: int) -> TrainConfig:
    config = copy.deepcopy(cfg.base)
    for path, value in overrides.items():
        _set(config, path, value)
    config["seed"] = seed
    config["name"] = cfg.name
    if cfg.stop.steps is not None:
        config["steps"] = cfg.stop.steps
    if cfg.stop.train_loss is not None:
        _set(config, "stop.train_loss", cfg.stop.train_loss)
    return load_config(config)


def load_study(source: StudyConfig | dict | str | os.PathLike) -> Study:
    """Validate a study file and expand it into its runs, before any work.

    Args:
        source: a :class:`StudyConfig`, a dict, or the path of a YAML file.

    Returns:
        The :class:`Study`.

    Raises:
        StudyError: naming each invalid field by its path (and, for a resolved
            training config that does not validate, the setting and seed).
        FileNotFoundError: the file does not exist.

    Example:
        >>> study = load_study({
        ...     "base": {"model": {"name": "mlp"}, "data": {"name": "digits"},
        ...              "steps": 10},
        ...     "grid": {"optim.lr": [0.05, 0.1]}, "seeds": [0, 1]})
        >>> len(study.runs), len(study.settings())
        (4, 2)
        >>> load_study({"base": {}, "grid": {"optim.lrr": [1]}})
        Traceback (most recent call last):
        ...
        lossgeom.study._config.StudyError: invalid study file (dict):
          (top level): grid.optim.lrr: unknown config path 'optim.lrr': ...
    """
    source, where = read_source(
        source, "study file", "name, base, grid, seeds, probes", StudyError
    )
    if isinstance(source, StudyConfig):
        cfg = source
    else:
        if not isinstance(source, dict):
            raise StudyError(
                "a study file is a mapping of fields (name, base, grid, seeds, "
                f"probes, ...); got a {type(source).__name__}."
            )
        try:
            cfg = StudyConfig.model_validate(source)
        except ValidationError as err:
            raise StudyError(
                format_errors(err, f"invalid study file ({where})")
            ) from None
    runs = []
    for overrides in _settings(cfg):
        setting_id = None
        for seed in cfg.seeds:
            try:
                train_cfg = _resolve(cfg, overrides, seed)
            except (ConfigError, ValueError) as err:
                shown = ", ".join(f"{p}={v!r}" for p, v in overrides.items())
                raise StudyError(
                    f"{where}: the run with {shown or 'the base config'} and seed "
                    f"{seed} is invalid:\n{err}"
                ) from None
            plain = train_cfg.model_dump(mode="json")
            unnamed = {k: v for k, v in plain.items() if k != "name"}
            if setting_id is None:
                setting_id = content_hash(
                    {k: v for k, v in unnamed.items() if k != "seed"}
                )
            runs.append(
                RunSpec(
                    run_id=content_hash(unnamed),
                    setting_id=setting_id,
                    seed=seed,
                    overrides=overrides,
                    config=plain,
                )
            )
    _check_probe_columns(cfg, runs)
    study_data = cfg.model_dump(mode="json", exclude={"executor"})
    return Study(
        config=cfg, runs=runs, fingerprint=content_hash(study_data), source=where
    )


def _check_probe_columns(cfg: StudyConfig, runs: list[RunSpec]) -> None:
    """Probe columns must not shadow the columns the training metrics write."""
    from lossgeom.measures import default_key

    written: set[str] = set()
    for run in runs:
        m = run.config.get("metrics") or {}
        if m.get("sharpness"):
            written |= {"sharpness", "eos_threshold", "eos_ratio"}
        if m.get("trace_max_matvecs"):
            written.add("trace")
        for measure in m.get("measures", []):
            written.add(
                measure.get("key") or default_key(measure["name"], measure["options"])
            )
    for i, spec in enumerate(cfg.pairs.probes):
        if spec.step is None:
            continue
        late = [r for r in runs if spec.step > r.config["steps"]]
        missing = [r for r in runs if spec.step not in r.config["checkpoint"]["steps"]]
        if late or missing:
            raise StudyError(
                f"pairs.probes.{i} ({spec.name}) probes step {spec.step}: every run "
                f"must save a checkpoint there; add it to the base config "
                f"(checkpoint: {{steps: [{spec.step}]}})"
                + (f" and run at least {spec.step} steps" if late else "")
            )
    clash = sorted({p.column for p in cfg.probes} & written)
    if clash:
        raise StudyError(
            f"probe columns {clash} are also columns of the training metrics; give "
            "the probes other keys (e.g. key: probe_" + clash[0] + ")"
        )
