"""Typed stage options: one pydantic model per stage (`TrainConfig`, `SampleConfig`, ...).

The CLI verb, the Python API and an experiment's YAML section all build the same model, so a value is
checked once, the same way, wherever it comes from, and an experiment is checked whole when it is loaded.
A field's docstring is its documentation (`--help`, the option tables in docs/); `Flags` gives it other
command-line names.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from delia.errors import DeliaError


@dataclass(frozen=True)
class Flags:
    """Command-line names of a field, replacing the default `--field-name` (e.g. `Flags("--model", "-m")`)."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        object.__setattr__(self, "names", names)


_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}  # pydantic error type -> (operator, its key in the error's ctx)


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` field takes, also when it is optional (`Literal[...] | None`)."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return tuple(c for arg in typing.get_args(annotation) for c in _choices(arg))


class ConfigError(DeliaError):
    """Options that do not validate: one `where: field: reason` line per problem."""


class StageConfig(BaseModel):
    """Base of the stage configs: unknown keys are refused, every value is checked on assignment too."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
    verb: ClassVar[str] = ""  # the `delia VERB` these options belong to (default: the class name's stem)
    # Fields that do not change the work's output (whether to replace or resume it), or that the stage's identity
    # holds another way (the model, by its fingerprint).
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"model", "overwrite"})
    # Fields whose default changed: the value that an identity without them stands for (its default back then).
    # A config writes such a field into its identity when it is unset and its value is no longer that one.
    CHANGED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def build(cls, config: StageConfig | None = None, /, *, where: str | None = None, **options: Any) -> Self:
        """`config` (or the defaults) with `options` set on top, validated. `where` prefixes error lines
        (a file, a YAML section); the errors name options by their field names."""
        if config is not None and not isinstance(config, cls):
            raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
        values = {**(config.model_dump(exclude_unset=True) if config else {}), **options}
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError("\n".join(cls.problems(e, where))) from None

    @classmethod
    def problems(cls, error: ValidationError, where: str | None = None) -> list[str]:
        """Readable `where: field 'name': reason` lines of a ValidationError of this config."""
        lines = []
        for err in error.errors():
            loc = ".".join(map(str, err["loc"]))
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc, list(cls.model_fields), n=1)
                reason = f"{loc!r} is not an option of delia {cls.verb_name()}" + (
                    f" (did you mean {close[0]!r}?)" if close else "")
            elif err["type"] == "literal_error":
                choices = _choices(cls.model_fields[loc].annotation) if loc in cls.model_fields else ()
                close = difflib.get_close_matches(str(err["input"]), list(map(str, choices)), n=1)
                reason = (f"field {loc!r}: unknown {loc} {err['input']!r}; expected one of "
                          f"{', '.join(map(str, choices))}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            elif err["type"] in _BOUNDS:
                op, key = _BOUNDS[err["type"]]
                reason = f"field {loc!r}: {loc} must be {op} {err['ctx'][key]:g}, got {err['input']!r}"
            else:
                reason = err["msg"].removeprefix("Value error, ")
                reason = f"field {loc!r}: {reason}" if loc else reason
            lines.append(f"{where}: {reason}" if where else reason)
        return lines

    @classmethod
    def verb_name(cls) -> str:
        return cls.verb or cls.__name__.removesuffix("Config").lower()

    @classmethod
    def section(cls, options: dict[str, Any], owned: frozenset[str] = frozenset()) -> Self:
        """An experiment's section for this stage, typed: every key and value checked (one ValueError listing
        every problem), and the keys that `delia run` sets itself (`owned`) refused."""
        problems = [f"{key!r} is set by the experiment itself (task, seeds, arms), not in `{cls.verb_name()}:`"
                    for key in options if key in owned]
        try:
            config = cls.model_validate({k: v for k, v in options.items() if k not in owned})
        except ValidationError as e:
            problems += cls.problems(e)
        if problems:
            raise ValueError("; ".join(problems))
        return config

    def options(self) -> dict[str, Any]:
        """The options set, as written, without the fields in NOT_IDENTITY: what a stage's identity holds. A field
        whose default changed is also written when unset, unless it has its old default's value."""
        options = {k: v for k, v in self.written().items() if k not in self.NOT_IDENTITY}
        now = self.model_dump(mode="json", include=set(self.CHANGED_DEFAULTS))
        return options | {k: now[k] for k, old in self.CHANGED_DEFAULTS.items() if k not in options and now[k] != old}

    def written(self) -> dict[str, Any]:
        """The options set (given, or updated by `model_copy`), as JSON: what a stage's identity holds of them.
        A whole number is written as an int, also where the field is a float, so that `epochs: 1` keys a stage
        the same way whether it was read from YAML or validated."""
        return {k: int(v) if isinstance(v, float) and v.is_integer() else v
                for k, v in self.model_dump(mode="json", exclude_unset=True).items()}
