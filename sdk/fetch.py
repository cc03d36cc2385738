"""Bundle download: from a plain directory, a file:// URL or an http(s):// URL, resumable, verified.

Bundles are large (a ViT-B-32 bundle is about 600 MB) and never travel over MQTT. `fetch_bundle`
reads `manifest.yaml` first, checks that its bundle id matches its content, then fetches the files
the manifest lists (with `formats`, only those of the training format the device runs, plus the
shared ones: a ViT-B-32 bundle with both formats is 1.16 GB, one format about 585 MB) into
`<dest>/.<bundle_id>.part/`: each file lands in `<name>.part` and resumes from where it stopped
with an HTTP Range request (a cut connection is retried; a killed process resumes on the next call).
A file whose sha256 differs from the manifest is deleted and the bundle is refused. Only when every
file verified is the folder renamed to `<dest>/<bundle_id>`, so a half-downloaded bundle is never
mistaken for a good one.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar
from urllib.parse import quote, unquote, urlsplit

import yaml

from fedclip.sdk.errors import BundleError
from fedclip.sdk.hashing import sha256_bytes, sha256_file
from fedclip.sdk.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
MAX_MANIFEST_BYTES = 16 << 20


class _Interrupted(Exception):
    """A transfer stopped early; the `.part` file keeps what arrived."""


def _is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https", "file")


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + quote(rel)


class _Source:
    """Where a bundle's files come from; `open(rel, offset)` gives (stream, total size, resumed)."""

    def __init__(self, source: str, timeout: float):
        self.timeout = timeout
        self.base: str | None
        self.local: Path | None
        parts = urlsplit(source)
        if parts.scheme in ("http", "https"):
            self.base, self.local = source, None
        elif parts.scheme == "file":
            self.base, self.local = None, Path(unquote(parts.path))
        elif parts.scheme and len(parts.scheme) > 1:
            raise BundleError(f"bundle source {source!r}: scheme must be http://, https:// or file://")
        else:
            self.base, self.local = None, Path(source)
        if self.local is not None and self.local.name == MANIFEST_NAME:
            self.local = self.local.parent
        if self.base is not None and self.base.rstrip("/").endswith("/" + MANIFEST_NAME):
            self.base = self.base.rstrip("/")[: -len(MANIFEST_NAME) - 1]
        self.label = source

    def read_small(self, rel: str, limit: int) -> bytes:
        stream, size, _ = self.open(rel, 0)
        with stream:
            if size is not None and size > limit:
                raise BundleError(f"{self.label}: {rel} is larger than {limit} bytes ({size})")
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise BundleError(f"{self.label}: {rel} is larger than {limit} bytes")
        return data

    def open(self, rel: str, offset: int) -> tuple[_Stream, int | None, bool]:
        if self.local is not None:
            path = self.local / rel
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                raise BundleError(f"{self.label}: file {rel} is missing") from None
            except OSError as e:
                raise BundleError(f"{self.label}: cannot read {rel} ({e.strerror or e})") from None
            size = os.fstat(f.fileno()).st_size
            f.seek(min(offset, size))
            return f, size, offset > 0
        req = urllib.request.Request(_join(str(self.base), rel))  # base is set when local is not
        if offset > 0:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset > 0:  # nothing left past `offset`: the part is complete
                return _Empty(), offset, True
            if e.code == 404:
                raise BundleError(f"{self.label}: file {rel} is missing (HTTP 404)") from None
            raise BundleError(f"{self.label}: {rel}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise _Interrupted(f"{rel}: {getattr(e, 'reason', None) or e}") from None
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            rng = resp.headers.get("Content-Range", "")
            total = rng.rsplit("/", 1)[-1] if "/" in rng else ""
            start = rng.split(" ", 1)[-1].split("-", 1)[0] if rng else ""
            if not start.isdigit() or int(start) != offset:
                resp.close()
                raise BundleError(f"{self.label}: {rel}: server answered the wrong range {rng!r}")
            return resp, int(total) if total.isdigit() else None, True
        # 200: the server ignored the range; the caller starts the file over.
        return resp, int(length) if length and length.isdigit() else None, False


class _Stream(Protocol):
    """What a download reads from: an HTTP response, a local file, or nothing left to read."""

    def read(self, n: int = -1, /) -> bytes: ...

    def read1(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self: _S) -> _S: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> object: ...


_S = TypeVar("_S", bound=_Stream)


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""

    read1 = read

    def close(self) -> None:
        pass

    def __enter__(self) -> _Empty:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _download(src: _Source, rel: str, part: Path, on_bytes: Callable[[int], None]) -> None:
    offset = part.stat().st_size if part.exists() else 0
    stream, total, resumed = src.open(rel, offset)
    with stream:
        if not resumed and offset:
            on_bytes(-offset)  # starting over: take back what the bar showed for the old part
            offset = 0
        mode = "ab" if resumed else "wb"
        with open(part, mode) as out:
            while True:
                try:
                    # read1: whatever has arrived, so a cut keeps all bytes received before it
                    chunk = stream.read1(_CHUNK)
                except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
                    raise _Interrupted(f"{rel}: connection lost ({type(e).__name__})") from None
                if not chunk:
                    break
                out.write(chunk)
                offset += len(chunk)
                on_bytes(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    if total is not None and offset < total:
        raise _Interrupted(f"{rel}: got {offset} of {total} bytes")


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def _sizes(src: _Source, files: dict[str, str]) -> dict[str, int | None]:
    if src.local is not None:
        return {
            rel: (src.local / rel).stat().st_size if (src.local / rel).is_file() else None for rel in files
        }
    return dict.fromkeys(files)  # http: sizes arrive with each response


def fetch_bundle(
    source: str | Path,
    dest: str | Path,
    *,
    formats: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 5,
    retry_delay: float = 0.5,
) -> Path:
    """Download (or copy) the bundle at `source` into `dest/<bundle_id>`, verified; return that folder.

    `formats`: the training formats this device can run, in order of preference; only the first one
    the bundle carries is fetched, with the shared files (`Manifest.format_files`). `()` fetches what
    inference needs and nothing to train with; None fetches every file. A bundle already under `dest`
    is verified and reused, and only files it lacks (another format asked for later) are fetched.
    Raises BundleError on a missing or corrupt file (the bad file is deleted), or when the source
    stays unreachable after `retries`.
    """
    source = str(source)
    dest = Path(dest)
    src = _Source(source, timeout)
    manifest_bytes = _with_retries(
        lambda: src.read_small(MANIFEST_NAME, MAX_MANIFEST_BYTES), retries, retry_delay, source
    )
    try:
        data = yaml.safe_load(manifest_bytes)
    except yaml.YAMLError:
        raise BundleError(f"{source}: {MANIFEST_NAME} is not valid YAML") from None
    manifest = Manifest.from_dict(data, f"{source}/{MANIFEST_NAME}")
    if manifest.canonical_id() != manifest.bundle_id:
        raise BundleError(f"{source}: manifest was modified (bundle id does not match its content)")
    # Manifest.from_dict refused names outside the bundle folder (`manifest.safe_relpath`).
    wanted = manifest.files_for(pick_format(manifest, formats, source))

    final = dest / manifest.bundle_id
    if final.is_dir():
        missing = {rel: d for rel, d in wanted.items() if not (final / rel).is_file()}
        if missing:  # another format than last time: add its files, each verified before it lands
            log.info("%s: fetching %d more files", final, len(missing))
            _fetch_files(src, source, missing, final, progress, retries, retry_delay)
        Manifest.load(final, verify=True)
        return final
    work = dest / f".{manifest.bundle_id}.part"
    work.mkdir(parents=True, exist_ok=True)
    _fetch_files(src, source, wanted, work, progress, retries, retry_delay)
    (work / MANIFEST_NAME).write_bytes(manifest_bytes)
    Manifest.load(work, verify=True)  # also catches files that changed on disk since they were checked
    if final.exists():  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        os.replace(work, final)
    return final


def pick_format(manifest: Manifest, formats: Sequence[str] | None, where: str) -> tuple[str, ...] | None:
    """The formats to fetch: the first of `formats` the bundle carries (None: all, `()`: none)."""
    if formats is None:
        return None
    if not formats:
        return ()
    for fmt in formats:
        if fmt in manifest.formats:
            return (fmt,)
    have = ", ".join(manifest.formats) or "none"
    raise BundleError(f"{where}: the bundle has no {' or '.join(formats)} format (it has: {have})")


def _fetch_files(
    src: _Source,
    source: str,
    files: dict[str, str],
    into: Path,
    progress: bool,
    retries: int,
    retry_delay: float,
) -> None:
    """Each of `files` into `into/<name>`: via `<name>.part` (resumed), sha256 checked, then renamed."""
    sizes = _sizes(src, files)
    todo = {rel: d for rel, d in sorted(files.items()) if not (into / rel).is_file()}
    with _progress(progress) as bar:
        known = (
            sum(s for s in sizes.values() if s is not None)
            if all(v is not None for v in sizes.values())
            else None
        )
        task = bar.add_task(f"bundle {into.name.strip('.')[:12]}", total=known) if bar else None

        def advance(n: int) -> None:
            if bar is not None:
                bar.advance(task, n)

        if bar is not None:
            for rel in files:
                size = sizes.get(rel)
                if rel not in todo and size is not None:
                    advance(size)
        for rel, digest in todo.items():
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            if bar is not None and part.exists():
                advance(part.stat().st_size)
            _with_retries(
                lambda rel=rel, part=part: _download(src, rel, part, advance), retries, retry_delay, source
            )
            if sha256_file(part) != digest:
                part.unlink()
                raise BundleError(f"{source}: file {rel} is corrupt (sha256 mismatch); refusing the bundle")
            os.replace(part, target)


def fetch_bytes(url: str, sha256: str, *, max_bytes: int, timeout: float = 30.0, retries: int = 3) -> bytes:
    """A small blob (an adapter past the MQTT size limit) by URL, refused unless its sha256 matches."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https", "file"):
        raise BundleError(f"{url!r}: scheme must be http://, https:// or file://")
    base, rel = url.rsplit("/", 1)
    src = _Source(base, timeout)

    def read() -> bytes:
        return src.read_small(unquote(rel), max_bytes)

    data = _with_retries(read, retries, 0.5, url)
    if sha256_bytes(data) != sha256:
        raise BundleError(f"{url}: content does not match its sha256; refused")
    return data


def _with_retries(fn, retries: int, delay: float, label: str):
    for attempt in range(retries + 1):
        try:
            return fn()
        except _Interrupted as e:
            if attempt == retries:
                raise BundleError(
                    f"{label}: download failed after {retries + 1} attempts ({e}); run again to resume"
                ) from None
            log.warning("%s: %s; resuming (attempt %d of %d)", label, e, attempt + 2, retries + 1)
            time.sleep(delay * (2**attempt))
    raise AssertionError("unreachable")
