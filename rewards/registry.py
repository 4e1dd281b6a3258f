"""The registry of built-in rewards, and how a recipe's reward names become functions.

A recipe names a reward either by its registry name (``accuracy``, ``format``, ...) or as the user's
own function: ``my_pkg.rewards:my_fn`` (an importable module) or ``path/to/file.py:my_fn``. Built-ins
are registered as factories, so a recipe can pass options (``get("accuracy", extract="boxed")``).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rewards.base import RewardFn

_BUILTIN_MODULES = (
    "rewards.math",
    "rewards.format",
    "rewards.numeric",
    "rewards.choice",
    "rewards.countdown",
    "rewards.shaping",
    "rewards.code",
)
_factories: dict[str, Callable[..., RewardFn]] = {}
_aliases: dict[str, str] = {}
_defaults: dict[str, RewardFn] = {}
_lock = threading.RLock()
_loaded = False


def register(
    name: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator: register a factory ``make(**options) -> reward function`` under ``name``.

    Every option must have a default, so ``get(name)`` works without options.
    """

    def decorate(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        for param in inspect.signature(factory).parameters.values():
            if param.default is inspect.Parameter.empty and param.kind not in (
                param.VAR_KEYWORD,
                param.VAR_POSITIONAL,
            ):
                raise TypeError(
                    f"reward factory {factory.__qualname__}: option {param.name!r} needs a default"
                )
        with _lock:
            for key in (name, *aliases):
                if key in _factories or key in _aliases:
                    raise ValueError(f"a reward named {key!r} is already registered")
            _factories[name] = factory
            for alias in aliases:
                _aliases[alias] = name
        return factory

    return decorate


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            for module in _BUILTIN_MODULES:
                importlib.import_module(module)
            _loaded = True


def names() -> list[str]:
    """Return the registered reward names (aliases included), sorted."""
    _load_builtins()
    return sorted([*_factories, *_aliases])


def options(name: str) -> dict[str, Any]:
    """Return the options reward ``name`` accepts, with their defaults."""
    factory = _factory(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind == p.POSITIONAL_OR_KEYWORD or p.kind == p.KEYWORD_ONLY
    }


def _factory(name: str) -> Callable[..., RewardFn]:
    _load_builtins()
    canonical = _aliases.get(name, name)
    factory = _factories.get(canonical)
    if factory is None:
        close = difflib.get_close_matches(name, names(), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(
            f"unknown reward {name!r}{hint}. Registered rewards: {', '.join(names())}. "
            "A reward of your own is given as 'package.module:function' or 'path/to/file.py:function'."
        )
    return factory


def _build(name: str, factory: Callable[..., RewardFn], opts: Mapping[str, Any]) -> RewardFn:
    try:
        inspect.signature(factory).bind(**opts)
    except TypeError:
        allowed = ", ".join(f"{k}={v!r}" for k, v in options(name).items()) if name in names() else ""
        allowed = allowed or ", ".join(inspect.signature(factory).parameters)
        raise ValueError(
            f"reward {name!r} does not accept options {sorted(opts)}; its options are: {allowed or '(none)'}"
        ) from None
    return factory(**opts)


def get(name: str, **opts: Any) -> RewardFn:
    """Return the registered reward ``name``, configured with ``opts`` (see :func:`options`).

    Without options the same function object is returned on every call.

    Raises:
        ValueError: unknown name (the message lists the registered names) or unknown option.
    """
    factory = _factory(name)
    if opts:
        return _build(name, factory, opts)
    canonical = _aliases.get(name, name)
    with _lock:
        if canonical not in _defaults:
            _defaults[canonical] = factory()
        return _defaults[canonical]


def _load_file(path: Path) -> Any:
    module_name = "rewards_user_" + "".join(c if c.isalnum() else "_" for c in str(path))
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def resolve(
    spec: str | Callable[..., Any],
    options: Mapping[str, Any] | None = None,
    *,
    base_dir: str | Path | None = None,
) -> RewardFn:
    """Turn a recipe's reward entry into a reward function.

    Args:
        spec: a registry name (``"accuracy"``), ``"package.module:function"``,
            ``"path/to/file.py:function"`` (relative paths are read from ``base_dir``, default the
            current directory), or a callable (returned as is).
        options: for a registry name, the factory's options; for a user function, when given, the
            named function is treated as a factory and called with them to build the reward.
        base_dir: directory relative file paths are resolved from (e.g. the recipe's directory).

    Raises:
        ValueError: the name, module, file or attribute does not exist; the message says what does.
    """
    opts = dict(options or {})
    if callable(spec):
        return spec(**opts) if opts else spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward is given by name or 'module:function', got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        return get(spec, **opts)
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_absolute():
            path = Path(base_dir or ".") / path
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: no file {path.resolve()}")
        module = _load_file(path.resolve())
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ValueError(f"reward {spec!r}: cannot import module {target!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ValueError(
                f"reward {spec!r}: {target} has no attribute {attr!r}; its public callables are: "
                f"{', '.join(available) or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward {spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return _build(spec, obj, opts) if opts else obj
