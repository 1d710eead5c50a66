"""The stream file: which topics the service reads, what their records hold, and which model scores each.

A TOML file, named by PIPELINE_STREAMS_FILE; without it the bundled default.toml applies (today's two
streams). Validation is strict, unknown keys included, so a typo cannot silently drop a setting, and
every error names its key, e.g. `streams[1].channels[2].role: must be one of scored, context (got 'score')`
(indexes count from 0, in file order).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import PipelineError
from schemas.types import ChannelName

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_VAR = "PIPELINE_STREAMS_FILE"
KINDS = ("sensors", "transactions")
ROLES = ("scored", "context")
BUNDLED_PREFIX = "bundled:"


class StreamsFileError(PipelineError):
    """The stream file is missing, not TOML, or breaks a rule; the message names the file and the key."""


def _one_of(allowed: tuple[str, ...]) -> Callable[[object], object]:
    def check(value: object) -> object:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)} (got {value!r})")
        return value

    return check


def _matching(pattern: str, what: str) -> Callable[[str], str]:
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"must be {what} (got {value!r})")
        return value

    return check


NAME_PATTERN = r"[a-z0-9_-]{1,64}"  # a stream's name, which is also its registry name (versions NAME-vN)
NAME_RULE = "1-64 characters of a-z, 0-9, _ and -"
StreamName = Annotated[str, AfterValidator(_matching(NAME_PATTERN, NAME_RULE))]
TopicName = Annotated[
    str, AfterValidator(_matching(r"[A-Za-z0-9._-]{1,249}", "a Kafka topic name (A-Z, a-z, 0-9, '.', '_', '-')"))
]
FieldName = Annotated[
    str, AfterValidator(_matching(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", "a record field name (letters, digits, _ . -)"))
]
Kind = Annotated[Literal["sensors", "transactions"], BeforeValidator(_one_of(KINDS))]
Role = Annotated[Literal["scored", "context"], BeforeValidator(_one_of(ROLES))]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(frozen=True)
class ModelRef:
    """Where a stream's model comes from: the registry (NAME@ALIAS or a version id NAME-vN), a checkpoint
    file, or a bundled model."""

    source: Literal["registry", "path", "bundled"]
    name: str  # registry: model name; path: the file; bundled: the bundled stream's name
    alias: str | None = None  # registry: NAME@ALIAS
    version: str | None = None  # registry: a version id

    @property
    def registry_ref(self) -> str:
        """What the registry resolves: the version id, or NAME@ALIAS."""
        return self.version or f"{self.name}@{self.alias}"


_REGISTRY_REF = re.compile(rf"({NAME_PATTERN})@([a-z0-9_-]{{1,64}})")
_VERSION_ID = re.compile(rf"({NAME_PATTERN})-v[0-9]+")  # pipeline.registry numbers a stream's versions so


def parse_model_ref(text: str) -> ModelRef:
    """NAME@ALIAS, a registry version id (NAME-vN), a path ending in .pt, or bundled:sensors /
    bundled:transactions; ValueError otherwise."""
    if text.startswith(BUNDLED_PREFIX):
        kind = text.removeprefix(BUNDLED_PREFIX)
        if kind not in KINDS:
            raise ValueError(f"bundled models are {', '.join(BUNDLED_PREFIX + k for k in KINDS)} (got {text!r})")
        return ModelRef("bundled", kind)
    if text.endswith(".pt"):
        return ModelRef("path", text)
    version = _VERSION_ID.fullmatch(text)
    if version is not None:
        return ModelRef("registry", version.group(1), version=text)
    m = _REGISTRY_REF.fullmatch(text)
    if m is None:
        raise ValueError(
            f"must be NAME@ALIAS or a version id NAME-vN (registry), a path to a .pt file, or bundled:KIND "
            f"(got {text!r})"
        )
    return ModelRef("registry", m.group(1), m.group(2))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _trimmed(value: str) -> str:
    if value != value.strip():
        raise ValueError(f"must not begin or end with a space (got {value!r}): a reading's key would have to match it")
    return value


class Channel(_Strict):
    name: Annotated[ChannelName, AfterValidator(_trimmed)]
    role: Role = "scored"  # context channels are decoded, kept and read by the model, but never scored
    unit: str | None = None
    min: FiniteFloat | None = None  # range hints (sanity checks, drift), not enforced on events
    max: FiniteFloat | None = None

    @model_validator(mode="after")
    def _range(self) -> Channel:
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min must be below max (got min={self.min}, max={self.max})")
        return self


class Stream(_Strict):
    name: StreamName
    topic: TopicName
    kind: Kind
    entity_key: FieldName  # the record field (training data: the column) holding the entity id
    time_field: FieldName  # the record field (training data: the column) holding the event time
    model: str
    challenger: str | None = None  # shadow-scored next to the model (a registry alias is followed while running)
    channels: list[Channel] = []
    # seconds of silence after which an entity's next event starts a new sequence context (window, LSTM state;
    # scaling and thresholds kept): a machine restarted after a stop. None: the context always continues
    context_gap_s: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None

    @field_validator("model", "challenger")
    @classmethod
    def _model_ref(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A relative .pt path is relative to the stream file's folder; the file must exist."""
        if value is None:
            return None
        ref = parse_model_ref(value)
        if ref.source != "path":
            return value
        path = Path(ref.name).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            raise ValueError(f"no model file at {path}")
        return str(path)

    @model_validator(mode="after")
    def _fits_kind(self) -> Stream:
        for key in ("model", "challenger"):
            text = getattr(self, key)
            if text is not None and parse_model_ref(text) == ModelRef("bundled", _other_kind(self.kind)):
                raise ValueError(
                    f"{key} {text!r} is the bundled {_other_kind(self.kind)} model; this stream is {self.kind}"
                )
        names = [c.name for c in self.channels]
        folded = [n.casefold() for n in names]  # 'flow' and 'FLOW': two channels no person tells apart
        dup = next((i for i, n in enumerate(folded) if n in folded[:i]), None)
        if dup is not None:
            first = names[folded.index(folded[dup])]
            same = "twice" if first == names[dup] else f"twice ({first!r} and {names[dup]!r} differ only in case)"
            raise ValueError(f"channel {names[dup]!r} is declared {same}")
        if self.entity_key == self.time_field:
            raise ValueError(f"entity_key and time_field are both {self.entity_key!r}")
        clash = {self.entity_key, self.time_field}.intersection(names)
        if clash:
            raise ValueError(f"channel {sorted(clash)[0]!r} has the name of the entity_key or time_field")
        if self.kind == "sensors":
            if not self.channels:
                raise ValueError("a sensors stream needs at least one [[streams.channels]]")
            if "values" in (self.entity_key, self.time_field):
                raise ValueError("'values' holds a sensor record's channels; it cannot be the entity_key or time_field")
            if not self.scored_channels:
                raise ValueError("a sensors stream needs at least one channel with role = 'scored'")
        elif self.channels:
            _check_transaction_channels(names)
        return self

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def scored_channels(self) -> list[str]:
        return [c.name for c in self.channels if c.role == "scored"]

    @property
    def model_ref(self) -> ModelRef:
        return parse_model_ref(self.model)

    @property
    def challenger_ref(self) -> ModelRef | None:
        return None if self.challenger is None else parse_model_ref(self.challenger)


def _other_kind(kind: str) -> str:
    return KINDS[1 - KINDS.index(kind)]


def _check_transaction_channels(names: list[str]) -> None:
    """A transactions stream's features are fixed by the transactions model; a channel list must name them."""
    from pipeline.features.streams import BASE_TRANSACTION_FEATURES
    from pipeline.features.terminal import FEEDBACK_FEATURES, TERMINAL_FEATURES

    base = list(BASE_TRANSACTION_FEATURES)
    layouts = [base, base + TERMINAL_FEATURES, base + TERMINAL_FEATURES + FEEDBACK_FEATURES]
    if names not in layouts:
        raise ValueError(
            "a transactions stream's channels are the transactions model's features; leave them out, or list "
            f"exactly {', '.join(base)} (optionally followed by the terminal features); got {', '.join(names)}"
        )


class StreamsFile(_Strict):
    streams: Annotated[list[Stream], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> StreamsFile:
        for key in ("name", "topic"):
            first: dict[str, int] = {}
            for i, s in enumerate(self.streams):
                value = getattr(s, key)
                if value in first:
                    raise ValueError(f"streams[{i}].{key}: {value!r} is already used by streams[{first[value]}]")
                first[value] = i
        return self

    def stream(self, name: str) -> Stream:
        for s in self.streams:
            if s.name == name:
                return s
        raise StreamsFileError(f"no stream {name!r} (the file declares {', '.join(s.name for s in self.streams)})")


def bundled_streams_file() -> Path:
    """The default stream file: today's `transactions` and `sensors` streams with the bundled models."""
    return Path(str(resources.files(__package__).joinpath("default.toml")))


def streams_file_from_env() -> Path:
    """PIPELINE_STREAMS_FILE, else the bundled default."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value) if value else bundled_streams_file()


def load_streams(path: str | Path) -> StreamsFile:
    """Read and validate a stream file; StreamsFileError with one line naming the file and the key."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise StreamsFileError(f"{path}: stream files are TOML (see pipeline/streams/default.toml)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not TOML
    except FileNotFoundError:
        raise StreamsFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamsFileError(f"{path}: cannot read: {exc}") from None
    return parse_streams(text, source=str(path), base_dir=path.parent)


def parse_streams(text: str, *, source: str = "<streams>", base_dir: Path | None = None) -> StreamsFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StreamsFileError(f"{source}: not valid TOML: {exc}") from None
    try:
        return StreamsFile.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise StreamsFileError(f"{source}: {describe(exc.errors(include_url=False)[0])}") from None


def describe(error: Any) -> str:
    """One pydantic error as `key.path[i].name: what is wrong (got ...)`."""
    loc = tuple(error["loc"])
    key = _key(loc)
    kind = error["type"]
    if kind == "value_error":
        message = str(error["ctx"]["error"])
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        message = f"unknown key (allowed: {', '.join(_owner(loc[:-1]).model_fields)})"
    elif kind == "too_short" and loc == ("streams",):
        message = "declare at least one [[streams]]"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {error['input']!r})"
    return f"{key}: {message}" if key else message


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _owner(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model whose keys live at `loc` (for the list of allowed keys)."""
    names = [p for p in loc if isinstance(p, str)]
    if names == ["streams", "channels"]:
        return Channel
    if names == ["streams"]:
        return Stream
    return StreamsFile
