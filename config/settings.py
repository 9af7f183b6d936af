"""Typed settings: one section per component, layered TOML file < environment < command line.

:func:`load_settings` is the one way a run gets its configuration. It reads the TOML file
(``config/default.toml`` unless told otherwise), lets ``VOLBOT_<SECTION>__<FIELD>``
environment variables override it, then the CLI's explicit overrides, and validates the
result with every section forbidding unknown keys. Any problem becomes a
:class:`ConfigError` whose message is one line naming the field. Exchange credentials are
read from the environment only. See ``docs/CONFIG.md``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from adapters.binance import BinanceFeedConfig
from adapters.deribit import DeribitFeedConfig
from adapters.paper import PaperVenueConfig
from adapters.synthetic import SyntheticMarketConfig
from bot.features.engine import FeatureEngineConfig
from bot.logs import MIN_SECRET_LENGTH, register_secret
from bot.orders import OrderManagerConfig
from bot.risk import RiskConfig
from bot.state import StateBuilderConfig
from bot.store import DEFAULT_URL, async_database_url
from strategies.hedger import HedgerConfig
from strategies.hold import HoldPolicyConfig
from strategies.trend import TrendPolicyConfig

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")
ENV_PREFIX = "VOLBOT_"
ENV_NESTED_DELIMITER = "__"
_INPUT_REPR_LIMIT = 60


class ConfigError(Exception):
    """Invalid configuration; ``str(error)`` is one line the CLI prints before exiting with status 2."""


# --- sections owned here -----------------------------------------------------------------------


class RunConfig(BaseModel):
    """The run itself: seed, money, the engine's clocks and where files go."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of every random source that has no seed of its own")
    initial_cash: float = Field(100_000.0, gt=0, description="USDT cash of a fresh (not resumed) run")
    decision_interval_s: float = Field(60.0, gt=0, description="event time between policy decisions")
    snapshot_interval_s: float = Field(60.0, gt=0, description="event time between equity snapshots")
    checkpoint_interval_s: float = Field(5.0, gt=0, description="wall time between durable checkpoints")
    status_interval_s: float = Field(10.0, gt=0, description="wall time between status lines")
    var_dir: Path = Field(Path("var"), description="run outputs")
    policy: str = Field("trend", min_length=1, description="policy spec NAME[:PATH]")
    feed: Literal["synthetic", "binance", "binance+deribit"] = Field(
        "synthetic", description="market data of a paper run: the embedded market or live public feeds"
    )


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        DEFAULT_URL, description="SQLAlchemy URL; sqlite:/// and postgresql:// get async drivers"
    )

    @field_validator("url")
    @classmethod
    def _supported_database(cls, url: str) -> str:
        try:
            backend = async_database_url(url).get_backend_name()
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
        return url


class JournalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Path = Field(Path("var/journal"), description="one journal file per run")
    gzip: bool = Field(False, description="compress journals (.jsonl.gz)")


class LoggingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dir: Path = Field(Path("var/logs"), description="one JSON-lines log per run")
    json_file: bool = True
    console: bool = True

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level


class LiveConfig(BaseModel):
    """Real exchange access: off unless explicitly enabled; credentials only from the environment."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="opt in to sending orders to a real exchange")
    exchange: Literal["binance", "binanceusdm", "deribit"] = "binance"
    testnet: bool = True
    base_url: str | None = Field(
        None, description="REST root instead of the exchange's own (a local test exchange)"
    )
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None

    @field_validator("api_key", "api_secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"must have at least {MIN_SECRET_LENGTH} characters")
        return secret

    @model_validator(mode="after")
    def _credentials_when_enabled(self) -> LiveConfig:
        if self.enabled and (self.api_key is None or self.api_secret is None):
            raise ValueError(
                "enabled needs VOLBOT_LIVE__API_KEY and VOLBOT_LIVE__API_SECRET in the environment"
            )
        return self


# --- the whole -----------------------------------------------------------------------------------


class Settings(BaseSettings):
    """Every section; build it with :func:`load_settings` (``Settings()`` alone is the code defaults)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid", case_sensitive=False
    )

    run: RunConfig = Field(default_factory=RunConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    market: SyntheticMarketConfig = Field(default_factory=SyntheticMarketConfig)
    venue: PaperVenueConfig = Field(default_factory=PaperVenueConfig)
    orders: OrderManagerConfig = Field(default_factory=OrderManagerConfig)
    risk: RiskConfig = Field(default_factory=RiskConfig)
    features: FeatureEngineConfig = Field(default_factory=FeatureEngineConfig)
    state: StateBuilderConfig = Field(default_factory=StateBuilderConfig)
    trend: TrendPolicyConfig = Field(default_factory=TrendPolicyConfig)
    hold: HoldPolicyConfig = Field(default_factory=HoldPolicyConfig)
    binance: BinanceFeedConfig = Field(default_factory=BinanceFeedConfig)
    deribit: DeribitFeedConfig = Field(default_factory=DeribitFeedConfig)
    live: LiveConfig = Field(default_factory=LiveConfig)
    hedger: HedgerConfig = Field(default_factory=HedgerConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: :func:`load_settings` layers file, environment and overrides itself."""
        return (init_settings,)

    def redacted_dict(self) -> dict[str, Any]:
        """JSON-ready settings for the ``runs`` table: secrets masked, database password hidden."""
        data = self.model_dump(mode="json")  # SecretStr dumps as "**********"
        data["store"]["url"] = make_url(self.store.url).render_as_string(hide_password=True)
        return data


def _secret_fields() -> Iterator[tuple[str, str]]:
    """(section, field) of every credential: fields typed SecretStr."""
    for section, info in Settings.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if "SecretStr" in repr(field.annotation):
                    yield section, name


def _env_name(section: str, name: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{name.upper()}"


# --- loading -------------------------------------------------------------------------------------


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``path`` (default ``config/default.toml``) < ``VOLBOT_*`` environment < ``overrides``.

    ``overrides`` is nested like the file (``{"store": {"url": ...}}``). Credentials found
    anywhere but the environment are refused. Raises :class:`ConfigError`.
    """
    path = DEFAULT_CONFIG_PATH if path is None else Path(path)
    file_values = _read_toml(path)
    overrides = dict(overrides or {})
    _refuse_secrets(file_values, f"the file {path}")
    _refuse_secrets(overrides, "the command line")
    _refuse_unknown_env_sections()
    try:
        env_values = EnvSettingsSource(Settings)()
    except SettingsError as exc:
        raise ConfigError(f"config error: environment: {_one_line(str(exc))}") from None
    try:
        settings = Settings(**_merged(_merged(file_values, env_values), overrides))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    for section, name in _secret_fields():
        secret = getattr(getattr(settings, section), name)
        if secret is not None:
            register_secret(secret.get_secret_value())
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config error: {path}: cannot read settings file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path}: invalid TOML: {_one_line(str(exc))}") from None


def _refuse_secrets(values: Mapping[str, Any], origin: str) -> None:
    for section, name in _secret_fields():
        section_values = values.get(section)
        if isinstance(section_values, Mapping) and name in section_values:
            raise ConfigError(
                f"config error: {section}.{name}: credentials are read only from the environment "
                f"({_env_name(section, name)}), never from {origin}"
            )


def _refuse_unknown_env_sections() -> None:
    """A misspelt section in a variable name would otherwise be ignored without a word."""
    for key in os.environ:
        if key.upper().startswith(ENV_PREFIX):
            section = key[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER)[0].lower()
            if section not in Settings.model_fields:
                raise ConfigError(
                    f"config error: {key}: unknown section {section!r} "
                    f"(sections: {', '.join(Settings.model_fields)})"
                )


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, tables merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError) -> str:
    """The first error as ``config error: section.field: problem (got value)``, the others counted."""
    errors = exc.errors(include_url=False)
    first: ErrorDetails = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    shown = first.get("input")
    secret = any(part in {name for _, name in _secret_fields()} for part in first["loc"])
    if first["type"] != "missing" and not secret and not isinstance(shown, Mapping | list):
        text = repr(shown)
        message += f" (got {text if len(text) <= _INPUT_REPR_LIMIT else text[:_INPUT_REPR_LIMIT] + '...'})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return _one_line(f"config error: {where}: {message}{more}")


def _one_line(text: str) -> str:
    return " ".join(text.split())
