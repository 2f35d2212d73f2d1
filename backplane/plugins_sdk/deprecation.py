"""Deprecating SDK members without breaking plugins overnight.

The SDK promise (docs/plugins.md): a member that is going away keeps working
for one minor release, emitting a `DeprecationWarning` that names its
replacement and the SDK version that removes it. These helpers implement it:

- `deprecated(since=..., replacement=...)` decorates a function, method or class;
- `deprecated_alias(...)` + `module_getattr(...)` keep an old module-level name
  importable (PEP 562 ``__getattr__``) while pointing at the new object;
- `deprecated_override(base, old, new, since=...)` covers a method plugins
  override that gives way to a new one: the caller asks whether an object still
  implements only the old method, and if so calls it the old way and warns
  (used for ``ConfigPolicy.check_and_update_config``).

Every deprecation is recorded in `DEPRECATIONS`, so Backplane's own tests can
check that nothing outlives its announced removal version.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from backplane.plugins_sdk.version import SDK_VERSION, SdkVersion

T = TypeVar("T")


@dataclass(frozen=True)
class Deprecation:
    """One deprecated SDK member: what, since when, what to use, when it goes."""

    name: str
    since: str
    removed_in: str
    replacement: str | None

    def message(self) -> str:
        """The warning text plugin authors see."""
        text = (
            f"{self.name} is deprecated since plugin SDK {self.since} and will be removed "
            f"in SDK {self.removed_in}"
        )
        return text + (f"; use {self.replacement} instead" if self.replacement else "")

    def is_overdue(self, current: str = SDK_VERSION) -> bool:
        """True once the SDK reached the version that should have removed the member."""
        return SdkVersion.parse(current) >= SdkVersion.parse(self.removed_in)


# Every deprecation declared with the helpers below, in declaration order.
DEPRECATIONS: list[Deprecation] = []


def _default_removal(since: str) -> str:
    parsed = SdkVersion.parse(since)
    return str(SdkVersion(parsed.major, parsed.minor + 1))


def _record(name: str, since: str, replacement: str | None, removed_in: str | None) -> Deprecation:
    SdkVersion.parse(since)  # fail at declaration time on a malformed version
    entry = Deprecation(name, since, removed_in or _default_removal(since), replacement)
    DEPRECATIONS.append(entry)
    return entry


def deprecated(
    *, since: str, replacement: str | None = None, removed_in: str | None = None,
    name: str | None = None,
) -> Callable[[T], T]:
    """Mark a function, method or class as deprecated.

    Calling the function (or instantiating / subclassing the class) still works
    and emits a DeprecationWarning naming ``replacement`` and ``removed_in``
    (default: the minor after ``since``).
    """

    def decorate(obj: T) -> T:
        entry = _record(name or getattr(obj, "__qualname__", repr(obj)), since, replacement,
                        removed_in)
        if isinstance(obj, type):
            return _deprecate_class(obj, entry)  # type: ignore[return-value]

        @functools.wraps(obj)  # type: ignore[arg-type]
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            warnings.warn(entry.message(), DeprecationWarning, stacklevel=2)
            return obj(*args, **kwargs)  # type: ignore[operator]

        wrapper.__deprecation__ = entry  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _deprecate_class(cls: type, entry: Deprecation) -> type:
    original_init = cls.__init__
    original_init_subclass = cls.__dict__.get("__init_subclass__")

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if type(self) is cls:  # subclasses already warned at class creation
            warnings.warn(entry.message(), DeprecationWarning, stacklevel=2)
        original_init(self, *args, **kwargs)

    def __init_subclass__(sub: type, **kwargs: Any) -> None:
        warnings.warn(entry.message(), DeprecationWarning, stacklevel=2)
        if original_init_subclass is not None:
            original_init_subclass.__func__(sub, **kwargs)
        else:
            super(cls, sub).__init_subclass__(**kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    cls.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]
    cls.__deprecation__ = entry  # type: ignore[attr-defined]
    return cls


@dataclass(frozen=True)
class DeprecatedAlias:
    """An old module-level name that still resolves to ``target`` with a warning."""

    target: Any
    deprecation: Deprecation


def deprecated_alias(
    old_name: str, target: Any, *, since: str, replacement: str,
    removed_in: str | None = None,
) -> DeprecatedAlias:
    """Declare ``old_name`` as a deprecated alias of ``target`` (see `module_getattr`)."""
    return DeprecatedAlias(target, _record(old_name, since, replacement, removed_in))


def module_getattr(
    module_name: str, aliases: dict[str, DeprecatedAlias],
    fallback: Callable[[str], Any] | None = None,
) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` serving ``aliases`` with a DeprecationWarning.

    Usage in a module::

        __getattr__ = module_getattr(__name__, {
            "OldThing": deprecated_alias("OldThing", NewThing, since="1.1",
                                         replacement="NewThing"),
        })
    """

    def __getattr__(name: str) -> Any:
        alias = aliases.get(name)
        if alias is not None:
            warnings.warn(alias.deprecation.message(), DeprecationWarning, stacklevel=2)
            return alias.target
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


@dataclass(frozen=True)
class DeprecatedOverride:
    """A method subclasses used to override, replaced by ``new_name`` on ``base``.

    The code that calls the hook asks `implements_only_old` and, when true,
    calls the old method the old way after `warn`.
    """

    base: type
    old_name: str
    new_name: str
    deprecation: Deprecation

    def implements_only_old(self, obj: Any) -> bool:
        """True when ``obj``'s class overrides the old method but not the new one."""
        return _overrides(type(obj), self.base, self.old_name) and not self.implements_new(obj)

    def implements_new(self, obj: Any) -> bool:
        """True when ``obj``'s class overrides the new method."""
        return _overrides(type(obj), self.base, self.new_name)

    def warn(self, obj: Any, stacklevel: int = 3) -> None:
        """DeprecationWarning naming ``obj``'s class, the replacement and the removal version."""
        cls = type(obj)
        warnings.warn(f"{cls.__module__}.{cls.__qualname__}: {self.deprecation.message()}",
                      DeprecationWarning, stacklevel=stacklevel)


def _overrides(cls: type, base: type, name: str) -> bool:
    return getattr(cls, name, None) is not base.__dict__.get(name)


def deprecated_override(
    base: type, old_name: str, new_name: str, *, since: str, replacement: str | None = None,
    removed_in: str | None = None,
) -> DeprecatedOverride:
    """Declare that overriding ``base.old_name`` is deprecated in favour of ``base.new_name``.

    ``replacement`` (default ``"<base>.<new_name>"``) is what the warning tells
    plugin authors to implement instead.
    """
    qualified = f"{base.__qualname__}.{{}}"
    entry = _record(qualified.format(old_name), since,
                    replacement or qualified.format(new_name), removed_in)
    return DeprecatedOverride(base, old_name, new_name, entry)
