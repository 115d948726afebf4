"""Typed pipeline settings, parsed once from ``params.yaml``.

``params.yaml`` is the one configuration file (DVC reads the same keys as stage params). It
is grouped by stage: each top-level section is one class here, unknown keys are errors (a
typo must not silently fall back to a default), and a bad value names its dotted key::

    params.yaml: validate.policies.pii_email: Input should be 'fail', 'warn' or 'quarantine'

Adding a stage = adding a section class and a field on :class:`Settings`. Relative paths
are relative to the folder holding ``params.yaml`` (the repository root); use
:meth:`Settings.path` to resolve them.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milora.config import DEFAULT_TARGETS, AdapterSpec
from milora.data.rules import RULES, Policy, default_policies
from milora.training.config import TrainConfig
from milora.yamlfile import YamlBudgetError, safe_load_bounded

DEFAULT_PARAMS = "params.yaml"


class SettingsError(ValueError):
    """``params.yaml`` is missing, not YAML, or has a bad key or value."""


class Section(BaseModel):
    """Base of every section: unknown keys are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ReplaySettings(Section):
    """General instruction data mixed into training against forgetting (LLaMA-Factory's dataset
    mixing): read by ingest as their own parts, checked by the same gate, never fact-checked
    or scored as company facts. ``train.profiles.<name>.replay_share`` is the share of every
    batch they take."""

    sources: list[str] = Field(
        default_factory=list, description="files or globs of general data (chat, Alpaca or prompt/completion)"
    )
    watch: str | None = Field(
        None,
        description="the folder holding them (the DVC ingest stage's second dependency); null: ingest.watch",
    )


class IngestSettings(Section):
    """Reading company exports into the normalised dataset."""

    sources: list[str] = Field(
        default_factory=list,
        description="files, folders or glob patterns, read in order (globs and folders sorted)",
    )
    watch: str = Field(".", description="the folder new drops land in (the DVC ingest stage's dependency)")
    ignore: list[str] = Field(
        default_factory=list,
        description="files/globs in watch that are not training data (evaluation sets are known already)",
    )
    out_dir: str = Field("data/interim/ingested", description="normalised rows, before validation")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of records in validation")
    split_salt: str = Field("milora", description="changing it reshuffles the split (on purpose only)")
    column_map: dict[str, str] = Field(default_factory=dict, description="export column -> canonical name")
    message_keys: dict[str, str] = Field(default_factory=dict, description="chat turn key -> role/content")
    role_map: dict[str, str] = Field(default_factory=dict, description="export role -> system/user/assistant")
    csv_delimiter: str = Field(",", min_length=1, max_length=1)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)

    @model_validator(mode="after")
    def _replay_watch(self) -> IngestSettings:
        if self.replay.watch is None:  # dvc.yaml depends on it: never null once parsed
            object.__setattr__(self, "replay", self.replay.model_copy(update={"watch": self.watch}))
        return self

    @field_validator("column_map")
    @classmethod
    def _known_targets(cls, value: dict[str, str]) -> dict[str, str]:
        from milora.data.normalise import CANONICAL_FIELDS

        bad = sorted(set(value.values()) - set(CANONICAL_FIELDS))
        if bad:
            raise ValueError(f"maps to unknown field(s) {bad}; canonical fields are {list(CANONICAL_FIELDS)}")
        return value

    @field_validator("message_keys")
    @classmethod
    def _message_targets(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(value.values()) - {"role", "content"})
        if bad:
            raise ValueError(f"maps to {bad}; a chat turn only has 'role' and 'content'")
        return value


class ContaminationSettings(Section):
    """Which evaluation sets training data must not overlap, and how overlap is found."""

    benchmarks: list[str] = Field(
        default_factory=lambda: ["../shared/benchmarks"],
        description="benchmark files/folders/globs (JSON lists or JSONL); a missing named path is an error",
    )
    optional: list[str] = Field(
        default_factory=list, description="benchmark paths checked when present (not on every machine)"
    )
    ngram: int = Field(13, ge=5, le=50, description="words in a shared passage that counts as a copy")
    max_item_frequency: int = Field(10, ge=1, description="n-grams in more benchmark items are templates")
    cache_dir: str | None = Field(".cache/contamination", description="index cache; null disables it")


class ImageSettings(Section):
    """Bounds on the images of vision-language records (rule ``image_size``)."""

    min_side: int = Field(8, ge=1, description="pixels: a narrower or shorter image is too small")
    max_side: int = Field(8192, ge=1, description="pixels: a wider or taller image is too large")
    max_bytes: int = Field(50_000_000, ge=1, description="a larger image file is too large")
    max_images: int = Field(8, ge=1, description="images one record may name")

    @model_validator(mode="after")
    def _ordered(self) -> ImageSettings:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is above max_side {self.max_side}")
        return self


class ValidateSettings(Section):
    """The Great Expectations gate and what each broken rule does."""

    dataset_dir: str = Field("data/dataset", description="the validated, versioned dataset")
    reports_dir: str = Field("outputs/validation", description="summary, quarantine file, Data Docs")
    gx_dir: str = Field("gx", description="GX project folder (expectation suite kept in the repo)")
    tokenizer: str | None = Field(None, description="tokenizer folder; null means base_model")
    max_tokens: int | None = Field(None, ge=1, description="null means the base model's context length")
    min_rows: int = Field(20, ge=0, description="minimum rows per drop, before and after quarantine")
    max_duplicate_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="max share of exact duplicates per drop"
    )
    pii_allow: list[str] = Field(
        default_factory=list, description="regexes of public values that are not PII (a support address)"
    )
    contamination: ContaminationSettings = Field(default_factory=ContaminationSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    policies: dict[str, str] = Field(default_factory=dict, description="rule -> fail | warn | quarantine")

    @field_validator("policies")
    @classmethod
    def _known_rules(cls, value: dict[str, str]) -> dict[str, str]:
        problems = []
        for rule, policy in value.items():
            if rule not in RULES:
                problems.append(f"unknown rule {rule!r} (rules: {', '.join(RULES)})")
            elif policy not in RULES[rule].policies:
                allowed = " or ".join(RULES[rule].policies)
                problems.append(
                    f"{rule}: {policy!r} is not a policy for a {RULES[rule].level} rule (use {allowed})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("pii_allow")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a regular expression: {error}") from None
        return value

    def policy(self, rule: str) -> Policy:
        """The policy in force for ``rule`` (params.yaml, else the rule's default)."""
        return self.policies.get(rule, default_policies()[rule])  # type: ignore[return-value]


class ChampionStartSettings(Section):
    """How a run from the champion (``train.start: champion``) begins and what it trains on."""

    strategy: Literal["continue", "refold"] = Field(
        "refold",
        description="continue: keep training the champion's adapter; refold: merge it and "
        "initialise afresh in the merged weights' minor subspace",
    )
    profile: str | None = Field(
        None, description="hyperparameter profile of such a run (fewer steps); null: train.profile"
    )
    earlier_share: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="share of the still-valid company records of earlier months replayed with "
        "the new ones (0: only what changed since the champion's data)",
    )


class TrainSettings(Section):
    """What adapter to train and with which hyperparameter profile.

    ``profiles`` holds named sets of :class:`~milora.training.config.TrainConfig` fields:
    ``paper`` is the MiLoRA paper's LLM-Adapters setting, ``demo`` a small budget that
    fits the demo world on two CPU cores. ``profile`` picks one; ``dvc exp run -S
    train.method=lora`` or ``-S train.profile=paper`` change a run without editing code.
    """

    method: str = Field("milora", description="milora, pissa or lora")
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0, description="null: r for milora/pissa, 2r for lora")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="per-layer ranks: {module name or layer name: rank} (PEFT's rank_pattern); "
        "milora inspect --suggest prints one",
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    solver: str = Field("auto", description="decomposition solver: auto, gram, svd64, svd32")
    device: str | None = Field(None, description="SVD device; null = cuda when present, else cpu")
    cache_dir: str | None = Field(".cache/svd", description="decomposition cache; null disables it")
    init_dir: str = Field("outputs/init", description="the init stage's adapter; train starts from it")
    run_dir: str = Field("outputs/train", description="checkpoints, metrics, adapters")
    profile: str = Field("paper", description="key of profiles")
    profiles: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"paper": {}})
    start: Literal["base", "champion"] = Field(
        "base", description="base: every run from the stock base on all data; champion: from the champion"
    )
    from_champion: ChampionStartSettings = Field(default_factory=ChampionStartSettings)
    parent_dir: str = Field(
        "outputs/parent", description="the run's parent (the champion fetched from the registry)"
    )
    serve_rank: int | None = Field(
        None, ge=1, description="served plain LoRA truncated to this rank (vLLM max_lora_rank); null: exact"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        for key, name in (("profile", self.profile), ("from_champion.profile", self.from_champion.profile)):
            if name is not None and name not in self.profiles:
                raise ValueError(f"{key} {name!r} is not one of profiles: {sorted(self.profiles)}")
        for name in self.profiles:
            try:
                self._config(name)
            except (TypeError, ValueError) as error:
                raise ValueError(f"profiles.{name}: {error}") from None
        self.adapter_spec()
        return self

    def _config(self, name: str) -> TrainConfig:
        values = self.profiles[name]
        known = {f.name: f for f in fields(TrainConfig)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; see milora/training/config.py")
        for key, value in values.items():  # YAML reads 2e-3 as a string: say so, not a TypeError later
            numeric = str(known[key].type).split(" | ")[0] in ("float", "int")
            if numeric and isinstance(value, str):
                raise ValueError(
                    f"{key}: {value!r} is not a number (YAML needs a dot: write 2.0e-3, not 2e-3)"
                )
        return TrainConfig(**values)

    def hyperparameters(self, from_champion: bool = False) -> TrainConfig:
        """The selected profile as a validated :class:`TrainConfig` (``from_champion``: the
        profile of a run that starts from the champion)."""
        return self._config((self.from_champion.profile if from_champion else None) or self.profile)

    def adapter_spec(self, method: str | None = None, rank: int | None = None) -> AdapterSpec:
        """The adapter these settings describe; ``method``/``rank`` override the configured
        ones (a comparison run), alpha then defaulting for that method unless set."""
        return AdapterSpec(
            method or self.method,
            rank or self.rank,
            self.alpha,
            tuple(self.target_modules),
            self.dropout,
            self.solver,
            rank_pattern=dict(self.rank_pattern),
        )


class SuiteSettings(Section):
    """One evaluation suite: a file (or glob) in one of the supported formats.

    ``prompt`` is ``chat`` (the tokenizer's chat template, as in training) or a format
    string such as ``"Question: {question} Answer:"`` for a base model's own text format.
    ``retention: true`` marks what the base model already knew: it is scored on the base
    too and the drop is reported as forgetting.
    """

    kind: str = Field(description="a kind of milora.evaluation.kinds.SUITE_KINDS: qa, commonsense, ...")
    path: str | list[str] = Field(description="file, glob or list of them (JSON list or JSONL)")
    required: bool = Field(True, description="false: skipped with a warning when no file matches")
    limit: int | None = Field(None, ge=1, description="first N items per file; null = all")
    prompt: str = Field("chat", description="'chat' or a format string over the item's fields")
    metric: str | None = Field(None, description="headline metric; null = the suite's default")
    mode: Literal["generate", "loglik"] = Field("generate", description="commonsense protocol")
    template: str = Field("{text}", description="perplexity: format string giving each text")
    max_new_tokens: int | None = Field(None, ge=1, description="null = the suite's default")
    retention: bool = Field(False, description="scored on the base too; drop = forgetting")
    current_truth: bool = Field(
        False,
        description="qa: one item per fact (id/key), scored against its newest drop's answer; stale rate",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from milora.evaluation.kinds import SUITE_KINDS

        if value not in SUITE_KINDS:
            raise ValueError(f"unknown suite kind {value!r}; kinds: {', '.join(SUITE_KINDS)}")
        return value

    @model_validator(mode="after")
    def _metric_of_kind(self) -> SuiteSettings:
        from milora.evaluation.kinds import SUITE_KINDS

        metrics = SUITE_KINDS[self.kind].metrics
        if self.metric is not None and self.metric not in metrics:
            raise ValueError(
                f"metric {self.metric!r} is not one of a {self.kind} suite's: {', '.join(metrics)}"
            )
        return self

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class EvaluateSettings(Section):
    """Which suites score a trained adapter, and where the results go."""

    out_dir: str = Field("outputs/eval", description="one JSON per suite, metrics.json, summary.md")
    cache_dir: str | None = Field(".cache/eval", description="base-model results, keyed by weights + suite")
    batch_size: int = Field(32, ge=1)
    merged: bool = Field(False, description="evaluate merged weights instead of base + adapter")
    suites: dict[str, SuiteSettings] = Field(default_factory=dict)


class GateSettings(Section):
    """When a challenger may replace the champion (every condition must hold)."""

    primary_suite: str = Field("company", description="the suite fine-tuning is for; must not drop")
    min_primary_gain: float = Field(0.0, description="challenger - champion on primary_suite, at least")
    max_forgetting: float = Field(
        0.1, ge=0.0, description="largest forgetting allowed on any retention suite"
    )
    tolerance: float = Field(
        0.02,
        ge=0.0,
        description="other suites may drop this much below the champion (perplexity: relative rise)",
    )
    max_stale: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="primary suite: share of changed facts answered with an old value, at most",
    )
    max_compression_error: float = Field(
        0.05,
        ge=0.0,
        description="served adapter truncated to train.serve_rank: largest relative error of a layer's delta",
    )


class RegistrySettings(Section):
    """MLflow tracking and model registry; ``MLFLOW_TRACKING_URI`` in the environment wins."""

    tracking_uri: str = Field(
        "sqlite:///mlflow.db", description="relative sqlite paths: from the project root"
    )
    artifact_location: str = Field("mlartifacts", description="where a new experiment stores artifacts")
    experiment: str = Field("milora-retrain")
    model_name: str = Field("milora-company-assistant", description="registered model name")
    champion_dir: str = Field(
        "outputs/champion", description="the champion re-scored on the challenger's items (paired.json)"
    )
    gate: GateSettings = Field(default_factory=GateSettings)


class CompareSettings(Section):
    """The method comparison: lora, pissa and milora at equal rank and budget, several seeds,
    scored at several points along training (learning and forgetting move together, so one
    end-of-training number can mislead). ``null`` values fall back to ``train`` and its
    profile, so the comparison trains what the pipeline trains unless told otherwise."""

    methods: list[str] = Field(
        default_factory=lambda: ["lora", "pissa", "milora"], min_length=1, description="methods compared"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [1, 2, 3], min_length=1, description="one run per method and seed (>= 3)"
    )
    rank: int | None = Field(None, ge=1, description="null: train.rank (equal for every method)")
    profile: str | None = Field(None, description="hyperparameter profile; null: train.profile")
    steps: int | None = Field(None, ge=1, description="optimiser steps per run; null: the profile's")
    eval_every: int = Field(50, ge=1, description="evaluate a snapshot every N steps (and at the end)")
    learning_rate: float | None = Field(None, gt=0, description="shared by every method; null: profile's")
    replay_share: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="share of each batch from ingest.replay; null: profile's (0: the method alone)",
    )
    lr_sweep: list[float] = Field(
        default_factory=list, description="fairness check: these learning rates per method (empty: none)"
    )
    sweep_seeds: int = Field(1, ge=1, description="the sweep uses the first N of seeds")
    suites: list[str] | None = Field(None, description="evaluate.suites names scored; null: all")
    matched_company: float | None = Field(
        None,
        description="score of registry.gate.primary_suite (the company suite) at which forgetting is "
        "compared; null: the highest every main run reaches",
    )
    out_dir: str = Field("outputs/compare", description="runs/, table.md, table.csv, plots")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        from milora.config import METHODS

        bad = sorted(set(value) - set(METHODS))
        if bad or len(set(value)) != len(value):
            raise ValueError(f"methods must be distinct names among {list(METHODS)}, got {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @field_validator("lr_sweep")
    @classmethod
    def _positive_rates(cls, value: list[float]) -> list[float]:
        if any(rate <= 0 for rate in value):
            raise ValueError(f"learning rates must be positive, got {value}")
        return value

    def hyperparameters(self, train: TrainSettings) -> TrainConfig:
        """The profile every compared run starts from, with this section's steps, rate and
        replay share."""
        from dataclasses import replace

        config = train._config(self.profile or train.profile)
        return replace(
            config,
            max_steps=self.steps or config.max_steps,
            learning_rate=self.learning_rate or config.learning_rate,
            replay_share=config.replay_share if self.replay_share is None else self.replay_share,
        )


class Settings(Section):
    """All of ``params.yaml``; ``root`` is the folder relative paths start from."""

    root: Path = Field(default=Path("."), exclude=True)
    base_model: str = Field("data/demo/base_model", description="Hugging Face model folder")
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    validation: ValidateSettings = Field(default_factory=ValidateSettings, alias="validate")
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluation: EvaluateSettings = Field(default_factory=EvaluateSettings, alias="evaluate")
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    compare: CompareSettings = Field(default_factory=CompareSettings)

    @model_validator(mode="after")
    def _compare_refers_to_known(self) -> Settings:
        profile = self.compare.profile
        if profile is not None and profile not in self.train.profiles:
            raise ValueError(
                f"compare.profile {profile!r} is not one of train.profiles: {sorted(self.train.profiles)}"
            )
        unknown = sorted(set(self.compare.suites or []) - set(self.evaluation.suites))
        if unknown:
            raise ValueError(
                f"compare.suites {unknown} are not in evaluate.suites: {sorted(self.evaluation.suites)}"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_root_in_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and "root" in data and not isinstance(data.get("root"), Path):
            raise ValueError("'root' is not a params.yaml key (paths are relative to the file's folder)")
        return data

    def path(self, value: str | Path) -> Path:
        """A configured path, resolved against the project root."""
        path = Path(value)
        return path if path.is_absolute() else self.root / path

    @property
    def tokenizer_path(self) -> Path:
        return self.path(self.validation.tokenizer or self.base_model)

    def with_overrides(self, changes: dict[str, Any]) -> Settings:
        """A copy with dotted keys changed (``{"validate.min_rows": 1}``), validated again."""
        data = self.model_dump(by_alias=True)
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        return _parse(data, self.root, "overrides")


def _parse(data: dict[str, Any], root: Path, origin: str) -> Settings:
    try:
        return Settings.model_validate({**data, "root": Path(root)})
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
            message = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                message = "unknown key (check the spelling; see milora/settings.py for the keys)"
            lines.append(f"{origin}: {key}: {message}")
        raise SettingsError("\n".join(lines)) from None


def load_settings(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Settings:
    """Parse ``params.yaml`` once into :class:`Settings` (clear errors naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: no such file (the pipeline's parameters live in params.yaml)")
    try:
        data = safe_load_bounded(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML: {error}") from None
    except YamlBudgetError as error:
        raise SettingsError(f"{path}: refused: {error}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    settings = _parse(data, path.resolve().parent, str(path))
    return settings.with_overrides(overrides) if overrides else settings
