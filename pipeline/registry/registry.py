"""Model versions per stream, with champion/challenger aliases and a promotion history, kept in the database
(weights included) so every replica of the service sees the same versions.

The registry logic lives here and talks to a `RegistryStore` (pipeline/sinks/registry.py implements it on
SQL): this module imports neither SQLAlchemy nor torch at import time.

Rollback walks the history back: every promotion of an alias pushes a version, every rollback pops to the
version it restored, so rolling back twice goes two promotions back, not back and forth.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import PipelineError
from pipeline.streams.config import NAME_PATTERN, NAME_RULE

if TYPE_CHECKING:
    from models.lstm_ae import Checkpoint
    from models.lstm_forecast import ForecastCheckpoint

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)
AUTOENCODER = "lstm_ae"  # the family of checkpoint files that name none


class RegistryError(PipelineError):
    """A registry request that cannot be honoured; the message says why in one line."""


class RegistryConflict(RegistryError):
    """An alias moved between reading it and changing it (another operator or replica); try again."""


@dataclass(frozen=True)
class ModelVersion:
    version: str  # <stream>-v<N>
    stream: str
    family: str
    created_at: datetime
    content_hash: str  # sha256 of the checkpoint file's bytes
    size: int
    card: dict[str, Any]

    @property
    def channels(self) -> list[str]:
        return [str(c) for c in self.card.get("feature_names") or ()]


@dataclass(frozen=True)
class AliasState:
    stream: str
    alias: str
    version: str
    generation: int  # id of the promotion that set it: grows with every change of any alias
    updated_at: datetime


@dataclass(frozen=True)
class Promotion:
    id: int
    stream: str
    alias: str
    action: str  # promote | rollback | clear
    version: str | None  # None: the alias was cleared
    previous_version: str | None
    at: datetime
    by: str


@dataclass(frozen=True)
class AliasMove:
    """Point stream@alias at `version` (None: remove the alias) if it still points at `expected`."""

    stream: str
    alias: str
    version: str | None
    expected: str | None
    action: str


@dataclass(frozen=True)
class NewVersion:
    stream: str
    family: str
    content_hash: str
    card: dict[str, Any]
    blob: bytes


@dataclass(frozen=True)
class ResolvedModel:
    model: ModelVersion
    blob: bytes

    @property
    def card(self) -> dict[str, Any]:
        return self.model.card


class RegistryStore(Protocol):
    def add_version(self, new: NewVersion) -> tuple[ModelVersion, bool]:
        """The stream's version with this content hash, else a new one numbered after the stream's last;
        True when it was created."""

    def get_version(self, version: str) -> ModelVersion | None: ...

    def get_blob(self, version: str) -> bytes | None: ...

    def list_versions(self, stream: str | None) -> builtins.list[ModelVersion]: ...

    def delete_version(self, version: str) -> bool: ...

    def alias(self, stream: str, alias: str) -> AliasState | None:
        """One indexed lookup: the running service polls it."""

    def aliases(self, stream: str | None = None) -> builtins.list[AliasState]: ...

    def aliases_of(self, version: str) -> builtins.list[AliasState]: ...

    def generation(self) -> int:
        """The newest promotion id (0: none): unchanged means no alias moved."""

    def history(self, stream: str, alias: str) -> builtins.list[Promotion]:
        """The alias's promotion rows, oldest first."""

    def move_aliases(self, moves: Sequence[AliasMove], by: str) -> int:
        """Apply all moves and append their history rows in one transaction; RegistryConflict (nothing
        applied) when an alias no longer points at its move's `expected`. Returns the new generation."""


def parse_ref(ref: str) -> tuple[str, str]:
    """'pumps@champion' -> ('pumps', 'champion')."""
    stream, sep, alias = ref.partition("@")
    if not sep or not stream or alias not in ALIASES:
        raise RegistryError(f"model reference {ref!r}: expected STREAM@{'|'.join(ALIASES)}, e.g. pumps@champion")
    return stream, alias


def channel_mismatch(have: Sequence[str], expected: Sequence[str]) -> str | None:
    """What keeps a model with channels `have` from serving a stream that needs `expected`; None: nothing.
    Order is not compared: the stream's decoder picks channels by the model's feature names."""
    missing = [c for c in expected if c not in have]
    extra = [c for c in have if c not in expected]
    parts = [f"missing {', '.join(missing)}" if missing else "", f"extra {', '.join(extra)}" if extra else ""]
    return "; ".join(p for p in parts if p) or None


class ModelRegistry:
    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    def register(self, path_or_blob: str | Path | bytes, stream: str) -> str:
        """Store a checkpoint file (a path or its bytes) as a version of `stream`; the same content again
        for the same stream is the existing version."""
        if not re.fullmatch(NAME_PATTERN, stream):  # else no stream file could name its versions
            raise RegistryError(f"--stream {stream!r}: a stream name is {NAME_RULE}")
        if isinstance(path_or_blob, bytes):
            blob, source = path_or_blob, "checkpoint bytes"
        else:
            try:
                blob, source = Path(path_or_blob).read_bytes(), str(path_or_blob)
            except OSError as exc:
                raise RegistryError(f"cannot read {path_or_blob}: {exc.strerror or exc}") from None
        contents = _torch_load(blob, source)
        card = contents.get("card")
        if not isinstance(card, dict):
            raise RegistryError(f"{source}: the checkpoint holds no model card")
        new = NewVersion(
            stream=stream,
            family=str(contents.get("family") or AUTOENCODER),
            content_hash=hashlib.sha256(blob).hexdigest(),
            card=card,
            blob=blob,
        )
        model, _created = self.store.add_version(new)
        return model.version

    def list(self, stream: str | None = None) -> builtins.list[ModelVersion]:
        return self.store.list_versions(stream)

    def show(self, version: str) -> ModelVersion:
        model = self.store.get_version(version)
        if model is None:
            raise RegistryError(f"no model version {version!r} (see `pipeline models list`)")
        return model

    def current(self, stream: str, alias: str = CHAMPION) -> AliasState | None:
        """The version stream@alias points at now: one indexed query, cheap enough to poll."""
        return self.store.alias(stream, alias)

    def generation(self) -> int:
        """Grows with every promotion, rollback or cleared alias: a poller that sees the same value knows
        that nothing changed."""
        return self.store.generation()

    def aliases(self, stream: str | None = None) -> builtins.list[AliasState]:
        return self.store.aliases(stream)

    def promote(
        self,
        version: str,
        stream: str,
        alias: str = CHAMPION,
        *,
        expected_channels: Sequence[str] | None,
        by: str = "operator",
    ) -> AliasState:
        """Point stream@alias at `version`. Refused (and nothing changes) when the version belongs to another
        stream or its channels differ from `expected_channels` (None: the caller has nothing to check
        against). A challenger promoted to champion stops being the challenger."""
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}: {', '.join(ALIASES)}")
        model = self.show(version)
        if model.stream != stream:
            raise RegistryError(f"{version} was registered for stream {model.stream!r}, not {stream!r}")
        if expected_channels is not None:
            if not model.channels:
                raise RegistryError(f"cannot promote {version}: its card names no channels (feature_names)")
            mismatch = channel_mismatch(model.channels, expected_channels)
            if mismatch:
                raise RegistryError(
                    f"cannot promote {version} to {stream}@{alias}: its channels do not match the stream's ({mismatch})"
                )
        now = {a.alias: a.version for a in self.store.aliases(stream)}
        if now.get(alias) == version:
            return self._alias_state(stream, alias)
        if alias == CHALLENGER and now.get(CHAMPION) == version:
            raise RegistryError(f"{version} is the champion of {stream}: a challenger must be another version")
        moves = [AliasMove(stream, alias, version, now.get(alias), "promote")]
        if alias == CHAMPION and now.get(CHALLENGER) == version:
            moves.append(AliasMove(stream, CHALLENGER, None, version, "clear"))
        self.store.move_aliases(moves, by)
        return self._alias_state(stream, alias)

    def rollback(self, stream: str, alias: str = CHAMPION, *, by: str = "operator") -> AliasState:
        """Point stream@alias back at the version it had before its latest promotion (skipping versions
        deleted since)."""
        stack = self._alias_stack(stream, alias)
        current = stack.pop() if stack else None
        deleted = []
        while stack and self.store.get_version(stack[-1]) is None:
            deleted.append(stack.pop())
        if current is None or not stack:
            gone = f" (the earlier {', '.join(deleted)}: deleted)" if deleted else ""
            raise RegistryError(f"{stream}@{alias} has no previous version to roll back to{gone}")
        self.store.move_aliases([AliasMove(stream, alias, stack[-1], current, "rollback")], by)
        return self._alias_state(stream, alias)

    def delete(self, version: str) -> None:
        """Remove a version; refused while it is a champion or challenger."""
        self.show(version)
        in_use = self.store.aliases_of(version)
        if in_use:
            names = ", ".join(f"{a.stream}@{a.alias}" for a in in_use)
            raise RegistryError(f"{version} is in use as {names}: promote or roll back another version first")
        if not self.store.delete_version(version):
            raise RegistryError(f"no model version {version!r}")

    def resolve(self, ref: str) -> ResolvedModel:
        """'pumps@champion' (or a version id) -> the version's metadata, card and checkpoint bytes."""
        if "@" in ref:
            stream, alias = parse_ref(ref)
            state = self.store.alias(stream, alias)
            if state is None:
                raise RegistryError(f"{ref}: no version is promoted to {alias} of stream {stream!r}")
            version = state.version
        else:
            version = ref
        model = self.show(version)
        blob = self.store.get_blob(version)
        if blob is None:
            raise RegistryError(f"no model version {version!r}")
        return ResolvedModel(model, blob)

    def load(self, ref: str, map_location: str = "cpu", precision: str = "fp32") -> Checkpoint | ForecastCheckpoint:
        """The checkpoint object of a version or STREAM@ALIAS, loaded from the stored bytes (weights_only)."""
        resolved = self.resolve(ref)
        return checkpoint_from_bytes(resolved.blob, resolved.model.version, map_location, precision)

    def _alias_state(self, stream: str, alias: str) -> AliasState:
        state = self.store.alias(stream, alias)
        if state is None:  # the row was just written in a committed transaction
            raise RegistryConflict(f"{stream}@{alias} changed while it was being set: try again")
        return state

    def _alias_stack(self, stream: str, alias: str) -> builtins.list[str]:
        """The alias's versions as a stack (top = current), rebuilt from the append-only history."""
        stack: builtins.list[str] = []
        for row in self.store.history(stream, alias):
            if row.action == "clear" or row.version is None:
                stack.clear()
            elif row.action == "rollback":
                while stack and stack[-1] != row.version:
                    stack.pop()
                if not stack:
                    stack.append(row.version)
            else:
                stack.append(row.version)
        return stack


def _torch_load(blob: bytes, source: str) -> dict[str, Any]:
    import torch
    from torch.torch_version import TorchVersion

    try:
        with torch.serialization.safe_globals([TorchVersion]):
            contents = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line refusal
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in first:  # torch's advice to unpickle arbitrary objects is not ours to pass on
            first = "not a torch file, or one holding more than tensors and plain values"
        raise RegistryError(
            f"{source}: not a loadable model checkpoint ({first}); expected a .pt written by `pipeline train`"
        ) from None
    if not isinstance(contents, dict):
        raise RegistryError(f"{source}: not a model checkpoint (holds a {type(contents).__name__})")
    return contents


def checkpoint_from_bytes(
    blob: bytes, source: str, map_location: str = "cpu", precision: str = "fp32"
) -> Checkpoint | ForecastCheckpoint:
    """Either family's checkpoint object from a checkpoint file's bytes (as models.lstm_forecast.load_model)."""
    from models.lstm_ae import checkpoint_from_blob
    from models.lstm_forecast import FAMILY, from_blob

    contents = _torch_load(blob, source)
    if contents.get("family") == FAMILY:
        return from_blob(contents, source).with_precision(precision, map_location)
    return checkpoint_from_blob(contents, source, map_location, precision)
