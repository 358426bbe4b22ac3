"""Where a run keeps what it writes: a local directory (a shared volume on a cluster), or an object store
(`s3://bucket/run`, `gs://bucket/run`) that every node reaches without a shared filesystem, through pyarrow.fs.

A location is a plain string everywhere, so it reaches Ray actors as it is: a path, or a URI whose query carries
pyarrow's options (`s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http`). Credentials, region and endpoint
otherwise come from the standard variables (`ENV_VARS`: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), the AWS config
files or the node's instance role, as the AWS and Google SDKs read them. Every failure is a `StorageError` whose
message is one line naming the location (credentials in a URI are never shown).
"""
from __future__ import annotations

import os
import posixpath
import shutil
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from rlhf import files

ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CA_BUNDLE", "GOOGLE_APPLICATION_CREDENTIALS")
"""What the object-store clients read from the environment; a run's ranks get the driver's (`actors.runtime`)."""

_BUCKETED = ("s3", "gs", "gcs")
"""Schemes whose first path component is a bucket (`s3://bucket/key`)."""


class StorageError(Exception):
    """A location that cannot be used (unknown scheme, unreachable store, missing bucket), in one line."""


def is_uri(location: str) -> bool:
    """`s3://...`, `gs://...` and other URIs; False for local paths (a one-letter scheme is a Windows drive)."""
    return "://" in location and len(urlsplit(location).scheme) > 1


def join(location: str, *parts: str) -> str:
    """`location/part/...`; a URI keeps its query at the end."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    base, sep, query = location.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + sep + query


def display(location: str) -> str:
    """The location without credentials a URI may carry (`s3://KEY:SECRET@bucket`) or its query options."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


@lru_cache(maxsize=None)
def _store(root: str, endpoint: str) -> Any:
    """One filesystem per store, options and endpoint variable (connections and region lookups are reused)."""
    from pyarrow import fs
    return fs.FileSystem.from_uri(root)[0]


def filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a URI; a local path is on the local filesystem."""
    from pyarrow import fs
    if not is_uri(location):
        return fs.LocalFileSystem(), os.path.abspath(location)
    parts = urlsplit(location)
    try:
        if parts.scheme not in _BUCKETED:
            return fs.FileSystem.from_uri(location)
        if not parts.netloc:
            raise StorageError(f"{display(location)}: no bucket; write {parts.scheme}://BUCKET/PATH")
        root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        return _store(root, endpoint), (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError, its IO errors are OSErrors
        raise StorageError(f"{display(location)}: {_reason(err)}; use a local path, s3://BUCKET/PATH or "
                           "gs://BUCKET/PATH") from None


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def _call(location: str, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(f"{display(location)}: cannot {what} ({_reason(err)})") from None


def check(location: str) -> None:
    """Fail fast, before anything starts, when `location` cannot be written: an unknown scheme, a store that does
    not answer, a bucket that does not exist."""
    if not is_uri(location):
        return
    store, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    info = _call(location, "reach the store", store.get_file_info, bucket if urlsplit(location).scheme in _BUCKETED
                 else path)
    from pyarrow import fs
    if urlsplit(location).scheme in _BUCKETED and info.type != fs.FileType.Directory:
        raise StorageError(f"{display(location)}: bucket {bucket!r} does not exist (or these credentials cannot see "
                           "it); create it first")


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    from pyarrow import fs
    store, path = filesystem(location)
    return _call(location, "read", store.get_file_info, path).type != fs.FileType.NotFound


def read_text(location: str) -> str:
    """The file's text; FileNotFoundError when there is none."""
    if not is_uri(location):
        with open(location, encoding="utf-8") as f:
            return f.read()
    store, path = filesystem(location)

    def read() -> str:
        with store.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    return _call(location, "read", read)


def write_text(location: str, text: str) -> None:
    """Write a whole file, atomically: readers see the old file or the new one (a local file through
    `rlhf.files.write_text`, fsynced; an object store's put is atomic)."""
    if not is_uri(location):
        files.write_text(location, text)
        return
    store, path = filesystem(location)

    def write() -> None:
        with store.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))
    _call(location, "write", write)


def listdir(location: str) -> list[str]:
    """The names directly under `location`; [] when there is nothing."""
    if not is_uri(location):
        return os.listdir(location) if os.path.isdir(location) else []
    from pyarrow import fs
    store, path = filesystem(location)
    infos = _call(location, "list", store.get_file_info, fs.FileSelector(path, allow_not_found=True))
    return [info.base_name for info in infos]


def remove(location: str) -> None:
    """Delete a file or a directory tree; nothing there is fine."""
    if not is_uri(location):
        if os.path.isdir(location):
            shutil.rmtree(location)
        elif os.path.exists(location):
            os.remove(location)
        return
    from pyarrow import fs
    store, path = filesystem(location)
    kind = _call(location, "read", store.get_file_info, path).type
    if kind == fs.FileType.Directory:
        _call(location, "delete", store.delete_dir, path)
    elif kind == fs.FileType.File:
        _call(location, "delete", store.delete_file, path)


def upload(local_dir: str, location: str) -> None:
    """Copy every file under `local_dir` to the same relative path under `location` (other files there stay)."""
    from pyarrow import fs
    if not any(files for _, _, files in os.walk(local_dir)):
        return
    store, path = filesystem(location)
    _call(location, "upload to", fs.copy_files, os.path.abspath(local_dir), path, fs.LocalFileSystem(), store)


def download(location: str, local_dir: str, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `location` into `local_dir`, leaving out the top-level entries named in `skip`."""
    from pyarrow import fs
    store, path = filesystem(location)
    os.makedirs(local_dir, exist_ok=True)
    for name in listdir(location):
        if name in skip:
            continue
        source, target = f"{path}/{name}", os.path.join(local_dir, name)
        kind = _call(location, "read", store.get_file_info, source).type
        if kind == fs.FileType.Directory:
            os.makedirs(target, exist_ok=True)
        _call(location, "download from", fs.copy_files, source, target, store, fs.LocalFileSystem())


def mirror(local_dir: str, location: str, subdir: str) -> None:
    """Delete what `location/subdir` holds that `local_dir/subdir` no longer does (TensorBoard's event files a
    resumed run rewrote), after an `upload`."""
    from pyarrow import fs
    store, path = filesystem(join(location, subdir))
    kept = {os.path.relpath(os.path.join(d, f), os.path.join(local_dir, subdir))
            for d, _, files in os.walk(os.path.join(local_dir, subdir)) for f in files}
    infos = _call(location, "list", store.get_file_info, fs.FileSelector(path, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type == fs.FileType.File and info.path[len(path) + 1:] not in kept:
            _call(location, "delete", store.delete_file, info.path)


def environment() -> dict[str, str]:
    """The storage variables set in this process (`ENV_VARS`), for the runtime_env of ranks on other nodes."""
    return {name: os.environ[name] for name in ENV_VARS if os.environ.get(name)}
