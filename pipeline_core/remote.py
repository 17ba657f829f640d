"""fsspec URLs (s3://, gs://, az://) for OUTPUT and the data files: which optional extra each needs, the options a
filesystem gets from the manifest's `storage_options`, and keeping those options (credentials) out of what is written.

A URL whose filesystem package is not installed is a usage error naming the extra to install (exit 2): the job
cannot run here as it stands, and no retry helps.
"""

from __future__ import annotations

import copy

from pipeline_core.errors import UsageError

# protocol -> (the package fsspec needs for it, batchrun's extra that installs it)
EXTRAS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
}
REDACTED = "<redacted>"


def protocol(url: str) -> str:
    """"s3" of s3://bucket/x; "file" for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_remote(url: str) -> bool:
    """A URL batchrun reaches through fsspec: anything with a protocol but file://."""
    return protocol(url) != "file"


def options_for(url: str, storage_options: dict | None) -> dict:
    """The options of `url`'s filesystem, read as datasets reads `storage_options`: `{"s3": {...}}` gives each
    protocol its own, and a flat mapping applies to any (without the keys that name a protocol)."""
    options = storage_options or {}
    nested = options.get(protocol(url))
    if isinstance(nested, dict):
        return dict(nested)
    return {key: value for key, value in options.items() if not isinstance(value, dict) or key not in _protocols()}


def _protocols() -> set[str]:
    import fsspec

    return set(fsspec.available_protocols())


def filesystem(url: str, options: dict, key: str):
    """(fsspec filesystem, path inside it) for `url`; a usage error naming the extra when its package is missing.
    `key` names the manifest key the URL came from, for the message."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        raise missing_backend(url, key) from error
    except ValueError as error:  # "Protocol not known: xyz"
        raise UsageError(f"{key} {url}: {error}; use a local path or an s3://, gs:// or az:// URL") from error


def require_backend(url: str, key: str) -> None:
    """Exit 2 before any work when `url`'s filesystem package is not installed."""
    package, _ = EXTRAS.get(protocol(url), (None, None))
    if package is None:
        return
    try:
        __import__(package)
    except ImportError as error:
        raise missing_backend(url, key) from error


def missing_backend(url: str, key: str) -> UsageError:
    package, extra = EXTRAS.get(protocol(url), (None, None))
    if package is None:
        return UsageError(f"{key} {url}: fsspec has no installed filesystem for {protocol(url)}://")
    return UsageError(f'{key} {url} needs the {package} package: pip install "batchrun[{extra}]"')


def redacted(config: dict) -> dict:
    """The resolved manifest with every value under a `storage_options` key, and model.engine's api_key and headers,
    replaced (their keys stay, so a reader sees which were set): it goes into _batchrun.json, and they hold
    credentials."""
    clean = copy.deepcopy(config)
    for section in clean.values():
        if isinstance(section, dict) and section.get("storage_options"):
            section["storage_options"] = _hide(section["storage_options"])
    engine = (clean.get("model") or {}).get("engine")
    if isinstance(engine, dict):  # a server's credentials: its key and headers
        for name in ("api_key", "headers"):
            if engine.get(name):
                engine[name] = _hide(engine[name])
    return clean


def _hide(value):
    if isinstance(value, dict):
        return {key: _hide(item) for key, item in value.items()}
    return REDACTED
