"""`dataset.options`, checked against the config class of the builder that reads the files (CsvConfig, JsonConfig,
...): a misspelt option exits 2 naming the builder's options, instead of failing mid-run or being ignored.

The builder is known from the manifest where dataset.path names a packaged builder (`csv`) or is one data file
(`data/x.csv`). A dataset directory or hub id gets its builder from datasets when it loads, which then reports an
unknown option in its own words; `unknown_option_in` turns those into the same message.
"""

from __future__ import annotations

import codecs
import collections.abc
import os
import re
import types
import typing

from pipeline_core.manifest.spec import show
from pipeline_core.manifest.suggest import closest

# BuilderConfig's own fields, and features: not options of how the files are read. How to say each instead.
NOT_OPTIONS = {
    "name": "set dataset.name instead",
    "data_files": "set dataset.data_files instead",
    "data_dir": "name the files in dataset.data_files (or the directory in dataset.path) instead",
    "version": "it versions the builder, not how files are read; remove it",
    "description": "it describes the builder, not how files are read; remove it",
    "features": "column types cannot be written in a manifest; remove it (the builder infers them)",
}
# load_dataset's own arguments: an option of that name would reach load_dataset itself, not the builder
MANIFEST_KEYS = {"path": "dataset.path", "split": "dataset.split", "revision": "dataset.revision",
                 "streaming": "dataset.streaming", "storage_options": "dataset.storage_options"}
_UNKNOWN_KEY = re.compile(r"BuilderConfig (?P<config>\w+)\(.*\) doesn't have a '(?P<option>[^']*)' key", re.DOTALL)


def option_problems(options: dict, path: str) -> list[str]:
    """Every problem of `options` for a dataset at `path`: names that are not builder options wherever it is, and,
    where the builder is known from the path, names its config lacks and values of the wrong type."""
    problems = [_not_an_option(name) for name in options if _not_an_option(name)]
    builder = static_builder(path)
    if builder is None:
        return problems
    config = config_class(builder)
    hints = _hints(config)
    for name, value in options.items():
        if _not_an_option(name):
            continue
        if name not in hints:
            problems.append(unknown_option(builder, config, name))
        elif _takes_functions(hints[name]) and value:
            problems.append(f"dataset.options.{name} cannot be written in a manifest: {config.__name__}.{name} takes "
                            "Python functions; remove it")
        elif not _fits(value, hints[name]):
            problems.append(f"dataset.options.{name} must be {_describe(hints[name])}, got {show(value)} "
                            f"({config.__name__}.{name})")
        elif (why := _bad_codec(name, value)) is not None:
            problems.append(f"dataset.options.{name}: {why}")
    return problems


def static_builder(path: str) -> str | None:
    """The builder that reads `path`, where the manifest tells: a packaged builder's name, or one data file whose
    extension names its builder (as data/layouts.py reads it). None for a directory or a hub id."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE, _PACKAGED_DATASETS_MODULES

    if path in _PACKAGED_DATASETS_MODULES:
        return path
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        return _EXTENSION_TO_MODULE.get(os.path.splitext(expanded)[1].lower(), (None, None))[0]
    return None


def config_class(builder: str) -> type:
    from datasets.load import import_main_class
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return import_main_class(_PACKAGED_DATASETS_MODULES[builder][0]).BUILDER_CONFIG_CLASS


def unknown_option(builder: str | None, config: type, name: str) -> str:
    """The problem of an option `config` lacks, with the nearest one and all it has, for validation and load alike."""
    known = sorted(set(_hints(config)) - set(NOT_OPTIONS))
    suggestion = closest(name, known)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    owner = f"the {builder} builder ({config.__name__})" if builder else config.__name__
    return f"dataset.options.{name}: {owner} has no option {name!r}{hint} (its options: {', '.join(known) or 'none'})"


def unknown_option_in(message: str) -> str | None:
    """datasets' "BuilderConfig CsvConfig(...) doesn't have a 'sepp' key." as unknown_option's words; None for any
    other message."""
    from datasets.load import import_main_class
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    match = _UNKNOWN_KEY.search(message)
    if match is None:
        return None
    for builder, (module, _) in _PACKAGED_DATASETS_MODULES.items():
        config = import_main_class(module).BUILDER_CONFIG_CLASS
        if config.__name__ == match["config"]:
            return unknown_option(builder, config, match["option"])
    return f"dataset.options.{match['option']}: the dataset's builder ({match['config']}) has no such option"


def _not_an_option(name: str) -> str | None:
    if name in NOT_OPTIONS:
        return f"dataset.options.{name} is not a builder option: {NOT_OPTIONS[name]}"
    if name in MANIFEST_KEYS:
        return f"dataset.options.{name} is not a builder option: set {MANIFEST_KEYS[name]} instead"
    if name in _load_arguments():
        return (f"dataset.options.{name} is not a builder option but an argument of load_dataset, which batchrun "
                "sets itself; remove it")
    return None


def _load_arguments() -> set[str]:
    import inspect

    import datasets

    return set(inspect.signature(datasets.load_dataset).parameters) - {"config_kwargs"}


def _hints(config: type) -> dict:
    """option -> its annotation (a string where it cannot be resolved: then any value passes)."""
    import dataclasses

    try:
        resolved = typing.get_type_hints(config)
    except Exception:  # noqa: BLE001 - a builder's annotation this Python cannot evaluate: check names only
        resolved = {}
    return {field.name: resolved.get(field.name, field.type) for field in dataclasses.fields(config)}


def _fits(value, annotation) -> bool:
    """Whether a YAML value fits a config field's annotation. A form this check does not know passes: the builder
    then says what it thinks of the value when it reads."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any or isinstance(annotation, (str, typing.TypeVar)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation in (list, tuple):  # YAML has lists only
        return isinstance(value, list)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None  # tuple[int, ...]
        return isinstance(value, list) and (item is None or all(_fits(element, item) for element in value))
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (len(args) != 2 or all(_fits(element, args[1])
                                                                   for element in value.values()))
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return False  # a Python function: no YAML value is one
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _takes_functions(annotation) -> bool:
    """Whether an annotation holds Python functions somewhere (CSV converters: {column: function})."""
    if annotation is collections.abc.Callable or typing.get_origin(annotation) is collections.abc.Callable:
        return True
    return any(_takes_functions(arg) for arg in typing.get_args(annotation) if not isinstance(arg, (list, str)))


def _describe(annotation) -> str:
    """An annotation as a message says it: `int, list[int], str or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        named = [_describe(arg) for arg in args if arg is not type(None)]
        named += ["null"] if type(None) in args else []
        return ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0]
    if origin is typing.Literal:
        return "one of " + ", ".join(show(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


def _bad_codec(name: str, value) -> str | None:
    """An encoding or error handler Python does not know, which would otherwise fail only once files are read."""
    try:
        if name == "encoding" and isinstance(value, str):
            codecs.lookup(value)
        elif name == "encoding_errors" and isinstance(value, str):
            codecs.lookup_error(value)
    except LookupError:
        what = "encoding" if name == "encoding" else "encoding error handler (strict, replace, ignore, ...)"
        return f"unknown {what} {show(value)}"
    return None
