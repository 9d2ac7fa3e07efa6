"""Typed settings: the number types and the error wording every settings reader shares.

Every settings reader is a ``pydantic.BaseModel`` whose field types say their own
ranges (``Annotated`` pydantic constraints) and whose ``model_config`` is
:data:`STRICT` (``extra="forbid"``, finite numbers; :data:`STRICT_FROZEN` for the
frozen ones); :func:`check` validates a file's mapping into it. Building one
directly (``RouterSettings(slots=2)``) validates too; code that needs a value a
file may not hold (a sub-second timeout in a test) uses ``model_construct``,
which skips the checks. YAML hands over ``true``, ``"5"``, ``.inf`` and ``.nan`` as
readily as ``5``; each would pass a bare ``v >= minimum`` or fail far from the
file that held it (``True >= 1`` holds, ``.inf`` makes a timeout that never
fires), so the number types here refuse them.

pydantic's own messages name the location as a tuple and the rule in its own
words; :func:`check` turns the first error into one line that names the file's
section and key, e.g. ``router: slots must be an integer >= 1, not 0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping, TypeVar, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from serve.errors import MrisegError

T = TypeVar("T", bound=BaseModel)

#: the ``model_config`` of every settings model: a typo is an error, not a silently ignored key
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
#: :data:`STRICT` for settings that never change once read (hashable, shared between threads)
STRICT_FROZEN = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


@dataclass(frozen=True)
class Says:
    """What a field must be, in the error message, where the derived wording would not fit.

    Args:
        text: e.g. "a folder path"; the message reads "{key} must be {text}, not {value}".
        secret: never echo the value (a key or a password).
    """

    text: str
    secret: bool = False


@dataclass(frozen=True)
class Note:
    """Words added after the derived "an integer >= N" (e.g. "(1 MiB)")."""

    text: str


def _no_bool_or_text(value: Any) -> Any:
    # pydantic's lax mode takes True as 1 and "5" as 5: a YAML slip must not become a setting
    if isinstance(value, (bool, str, bytes)):
        raise PydanticCustomError("not_a_number", "not a number")
    return value


def whole(minimum: int, maximum: int | None = None, note: str = "") -> Any:
    """An integer field type: not a bool or a string, ``>= minimum`` (``<= maximum``); ``5.0`` counts.

    Args:
        minimum: the least value.
        maximum: the greatest value, if any.
        note: words after the bound in the error message.

    Returns:
        An ``Annotated[int, ...]`` type for a pydantic field.
    """
    extra = (Note(note),) if note else ()
    return Annotated[int, BeforeValidator(_no_bool_or_text), Field(ge=minimum, le=maximum), *extra]


def number(minimum: float, *, above: bool = False, maximum: float | None = None, says: str = "") -> Any:
    """A float field type: finite, not a bool or a string, ``>= minimum`` (``>`` with ``above``), ``<= maximum``.

    Args:
        minimum: the bound.
        above: the bound itself is refused.
        maximum: the greatest value, if any.
        says: the wording of the error message instead of the derived one.

    Returns:
        An ``Annotated[float, ...]`` type for a pydantic field.
    """
    bound = Field(gt=minimum, le=maximum, allow_inf_nan=False) if above else \
        Field(ge=minimum, le=maximum, allow_inf_nan=False)
    extra = (Says(says),) if says else ()
    return Annotated[float, BeforeValidator(_no_bool_or_text), bound, *extra]


def _markers(annotation: Any, metadata: list) -> list:
    """The metadata of a field and of the Annotated types inside it (``int | None`` holds one)."""
    out = list(metadata)
    if get_origin(annotation) is Annotated:
        out += list(annotation.__metadata__)
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        for arg in get_args(annotation):
            out += _markers(arg, [])
    return out


def _base(annotation: Any) -> Any:
    if get_origin(annotation) is Annotated:
        return _base(get_args(annotation)[0])
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        bases = [_base(a) for a in get_args(annotation) if a is not type(None)]
        return bases[0] if len(bases) == 1 else None
    return annotation


def _flatten(markers: list) -> list:
    out = []
    for m in markers:  # Field(...) arrives as a FieldInfo holding its own metadata
        out += _flatten(list(getattr(m, "metadata", []))) if type(m).__name__ == "FieldInfo" else [m]
    return out


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def describe(annotation: Any, metadata: list) -> tuple[str, bool]:
    """What a field must be, in words, and whether its value is a secret.

    Args:
        annotation: the field's type.
        metadata: the field's own metadata (pydantic's ``FieldInfo.metadata``).

    Returns:
        ("an integer >= 1", False), or the field's :class:`Says`; ("", False) for a field with neither.
    """
    markers = _flatten(_markers(annotation, metadata))
    for m in markers:
        if isinstance(m, Says):
            return m.text, m.secret
    base = _base(annotation)
    if base not in (int, float):
        return "", False
    lower = next((f"> {_shown(m.gt)}" for m in markers if isinstance(m, Gt)),
                 next((f">= {_shown(m.ge)}" for m in markers if isinstance(m, Ge)), ""))
    upper = next((f" and <= {_shown(m.le)}" for m in markers if isinstance(m, Le) and m.le is not None), "")
    notes = "".join(f" {m.text}" for m in markers if isinstance(m, Note))
    return f"{'an integer' if base is int else 'a number'} {lower}{upper}{notes}".replace("  ", " "), False


def setting_names(cls: type[BaseModel]) -> dict[str, tuple[Any, list]]:
    """The settings of a pydantic model: name -> (type, metadata), in the order written.

    Args:
        cls: a settings model.

    Returns:
        Each field's type (with its ``Annotated`` metadata) and any further metadata pydantic keeps apart.
    """
    return {name: (info.annotation, list(info.metadata)) for name, info in cls.model_fields.items()}


def error_line(cls: Any, error: ValidationError, unknown_what: str = "setting") -> str:
    """The first of pydantic's errors as one line naming the key (no prefix).

    Args:
        cls: the settings model that was validated.
        error: what pydantic raised.
        unknown_what: the word for a key in "unknown setting(s) [...]".

    Returns:
        e.g. "slots must be an integer >= 1, not 0", "unknown setting(s) ['slot']; known: ...".
    """
    fields = setting_names(cls)
    errors = error.errors(include_url=False)
    extra = sorted(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden")
    if extra:  # a typo would otherwise leave the default in force without a word
        return f"unknown {unknown_what}(s) {extra}; known: {', '.join(fields)}"
    first = errors[0]
    loc = first["loc"]
    message = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if first["type"] in ("model_type", "model_attributes_type"):
        section = _base(fields[str(loc[0])][0]) if loc and str(loc[0]) in fields else None
        if isinstance(section, type) and issubclass(section, BaseModel):  # a section that is a model itself
            return f"{loc[0]}: expected a mapping of settings ({', '.join(setting_names(section))})"
        return f"expected a mapping of settings ({', '.join(fields)})"
    if not loc or str(loc[0]) not in fields:
        return message
    key, (annotation, metadata) = str(loc[0]), fields[str(loc[0])]
    if first["type"] == "missing":
        return f"{key} is required"
    what, secret = describe(annotation, metadata)
    if not what or first["type"] == "value_error":  # a field's own validator: its message says what is wrong
        return f"{key}: {message}"
    shown = "(hidden)" if secret else f"{first.get('input')!r:.80}"
    return f"{key} must be {what}, not {shown}"


def check(cls: type[T], data: Mapping[str, Any] | None, where: str, unknown_what: str = "setting",
          **extra: Any) -> T:
    """Validate ``data`` into ``cls``, or raise one line naming the section and key.

    Args:
        cls: a settings model.
        data: the mapping from the settings file (None: all defaults).
        where: the prefix of the message ("router", "tenants: site a").
        unknown_what: the word for a key in "unknown setting(s)".
        extra: fields set by the caller rather than the file (e.g. a sub-model's name).

    Returns:
        The validated settings.

    Raises:
        MrisegError: "{where}: {key} must be ..., not ...", or "{where}: expected a mapping ...".
    """
    if data is not None and not isinstance(data, Mapping):
        raise MrisegError(f"{where}: expected a mapping of settings ({', '.join(setting_names(cls))})")
    try:
        return cls.model_validate({**(data or {}), **extra})
    except ValidationError as e:
        raise MrisegError(f"{where}: {error_line(cls, e, unknown_what)}") from None
