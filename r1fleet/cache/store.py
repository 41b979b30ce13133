"""The controller's artifact cache (issue 13 item 4): each pinned artifact fetched once, by sha256, verified.

Layout under the root (`cache_root()`):
    sha256/<hex>        the bytes, present only once their sha256 matched
    sha256/<hex>.json   name, urls, size, fetched_at, last_used, and the stamp written when it was verified
    sha256/<hex>.part   a download in progress or interrupted; the next fetch resumes it (HTTP Range). The
                        fetch holds a lock on it (flock) until the entry is whole and stamped: a second
                        r1fleet that needs it meanwhile waits while it grows, then takes the entry
    names/<key>         the sha256 a name stood for when it was cached (an Ollama tag's manifest), so a
                        rebuild gets the same bytes even after the registry re-published the tag

    cache = ArtifactCache(cache_root())
    path = cache.fetch(url, sha256, "DeepSeek-R1-Distill-Qwen-32B-Q4_K_M.gguf", progress=TerminalProgress())

The transfer (HTTP Range resume, stall detection) is r1fleet/cache/download.py.

An entry is a regular file, never followed through a link (its stamp is checked on the file itself, with
lstat and O_NOFOLLOW): someone able to write into the cache directory cannot make it serve another file. The
directories r1fleet creates are 0700.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from r1fleet.cache.download import CHUNK, DISK_FIX, Download, download
from r1fleet.errors import R1FleetError
from r1fleet.progress import NoProgress, Progress

ENV_DIR = "R1FLEET_CACHE_DIR"
HEX = re.compile(r"[0-9a-f]{64}")


def default_root(env: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/r1fleet/artifacts, else ~/.cache/r1fleet/artifacts. The XDG Base Directory
    Specification says a relative $XDG_CACHE_HOME is invalid and to be ignored, so it is."""
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "r1fleet" / "artifacts"


def cache_root(fleet_cache_dir: str | os.PathLike | None = None, env: Mapping[str, str] = os.environ) -> Path:
    """$R1FLEET_CACHE_DIR (a one-off override of a shared, committed fleet file), else the fleet file's
    `cache: {dir: ...}`, else default_root()."""
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR]).expanduser()
    return Path(fleet_cache_dir) if fleet_cache_dir else default_root(env)


@dataclass(frozen=True)
class Entry:
    name: str
    sha256: str
    size: int
    last_used: datetime
    fetched_at: datetime | None
    complete: bool  # False: a partial download (.part) that the next fetch resumes


def _digest(sha256: str) -> str:
    sha = sha256.lower().removeprefix("sha256:")
    if not HEX.fullmatch(sha):
        raise R1FleetError(f"{sha256!r} is not a sha256 (64 hex digits)", fix="give the artifact's pinned sha256")
    return sha


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _when(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _identity(path: Path) -> list[int]:
    # size, mtime and inode: a file rewritten or replaced since it was verified no longer matches its stamp
    # (as roles/common.py VerifiedDigest does on the hosts), so the 43 GB are not re-read on every use.
    # lstat: a link is not the entry, whatever it points at.
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _regular(path: Path) -> bool:
    """Whether `path` itself (not what a link names) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading when it is a regular file itself; OSError otherwise (a link, a FIFO, ...)."""
    handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK))
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise OSError(f"{path} is not a regular file")
    return handle


def hash_file(path: Path) -> Any:
    hasher = hashlib.sha256()
    with _open_regular(path) as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher


class ArtifactCache:
    """Content-addressed: an entry is its sha256; `path_for` serves only entries whose stamp still holds."""

    def __init__(self, root: str | os.PathLike, *, stall_timeout: float = 30.0, attempts: int = 5):
        self.root = Path(root)
        self.dir = self.root / "sha256"
        self.stall_timeout = stall_timeout  # seconds without a byte before a transfer counts as stalled
        self.attempts = attempts

    # ------------------------------------------------------------ entries

    def _paths(self, sha: str) -> tuple[Path, Path, Path]:
        return self.dir / sha, self.dir / f"{sha}.json", self.dir / f"{sha}.part"

    def _meta(self, sha: str) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.dir / f"{sha}.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _write_meta(self, sha: str, meta: dict[str, Any]) -> None:
        # Whole: the server's threads touch last_used while others read it.
        self._write_whole(self.dir / f"{sha}.json", json.dumps(meta, indent=1, sort_keys=True).encode())

    def _write_whole(self, target: Path, data: bytes) -> None:
        """Written beside, then renamed: a reader sees the old file or the new one, never a part."""
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _drop(self, sha: str) -> int:
        freed = 0
        for path in self._paths(sha):
            try:
                freed += path.stat().st_size if path.suffix != ".json" else 0
                path.unlink()
            except FileNotFoundError:
                pass
        return freed

    def path_for(self, sha256: str, touch: bool = True) -> Path | None:
        """The entry's file when present and verified, else None. Cheap: the size and the stamp written when
        it was hashed; a file changed since (another mtime or inode) is hashed again in full by verify()."""
        sha = _digest(sha256)
        data = self.dir / sha
        meta = self._meta(sha)
        if meta is None or not _regular(data):
            if os.path.islink(data):
                self._drop(sha)  # not an entry r1fleet made
            return None
        if os.lstat(data).st_size != meta.get("size"):
            self._drop(sha)  # truncated or grown: not the artifact, whatever its stamp says
            return None
        if meta.get("stamp") != [sha, *_identity(data)] and not self.verify(sha):
            return None
        if touch:
            self._write_meta(sha, {**(self._meta(sha) or meta), "last_used": _now()})
        return data

    def verify(self, sha256: str) -> bool:
        """Hash the entry in full: stamp it when good; delete it when not, so the next fetch gets it again."""
        sha = _digest(sha256)
        data = self.dir / sha
        if not _regular(data):
            return False
        if hash_file(data).hexdigest() != sha:
            self._drop(sha)
            return False
        meta = self._meta(sha) or {"name": sha, "urls": [], "fetched_at": None, "last_used": _now()}
        self._write_meta(sha, {**meta, "sha256": sha, "size": os.lstat(data).st_size, "stamp": [sha, *_identity(data)]})
        return True

    def open_entry(self, sha256: str) -> BinaryIO | None:
        """The entry opened for reading, or None: only a regular file (never through a link, hard or symbolic)
        whose stamp is that of the very file opened, so what is read is what was verified even if the name
        changed in between."""
        if self.path_for(sha256) is None:
            return None
        sha = _digest(sha256)
        try:
            handle = _open_regular(self.dir / sha)
        except OSError:
            return None
        st = os.fstat(handle.fileno())
        # one link: a hard link is a name for someone else's file too (r1fleet's own entries have one)
        if st.st_nlink != 1 or (self._meta(sha) or {}).get("stamp") != [sha, st.st_size, st.st_mtime_ns, st.st_ino]:
            handle.close()
            return None
        return handle

    def status(self) -> list[Entry]:
        """Every entry, and every partial download, by name."""
        entries = []
        for path in self.dir.glob("*") if self.dir.is_dir() else ():
            sha, _, suffix = path.name.partition(".")
            if not HEX.fullmatch(sha) or suffix not in ("", "part"):
                continue
            if suffix == "part" and (self.dir / sha).is_file():
                continue  # a stray part beside a whole entry: prune drops it with the entry
            meta = self._meta(sha) or {}
            st = path.stat()
            last_used = _when(meta.get("last_used")) or datetime.fromtimestamp(st.st_mtime, timezone.utc)
            entries.append(Entry(meta.get("name") or sha, sha, st.st_size, last_used,
                                 _when(meta.get("fetched_at")), complete=suffix == ""))
        return sorted(entries, key=lambda e: (e.name, e.sha256))

    def prune(self, keep: set[str] | None = None, older_than_days: float | None = None) -> int:
        """Delete the entries not in `keep` and (when given) unused for `older_than_days`; neither: all.
        Returns the bytes freed."""
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        keep = {_digest(s) for s in keep} if keep is not None else None
        freed = 0
        for entry in self.status():
            if keep is not None and entry.sha256 in keep:
                continue
            if cutoff is not None and entry.last_used.timestamp() >= cutoff:
                continue
            freed += self._drop(entry.sha256)
        for meta in self.dir.glob("*.json") if self.dir.is_dir() else ():
            if not any((self.dir / meta.stem).with_suffix(s).is_file() for s in ("", ".part")):
                meta.unlink(missing_ok=True)  # metadata whose bytes are gone
        return freed

    # ------------------------------------------------------------ names

    def put(self, data: bytes, name: str) -> str:
        """Enter bytes already at hand (a registry manifest) under their sha256, which it returns."""
        sha = hashlib.sha256(data).hexdigest()
        if self.path_for(sha) is None:
            self._make_dirs()
            self._write_whole(self.dir / sha, data)
            self._write_meta(sha, {"sha256": sha, "name": name, "urls": [], "size": len(data), "fetched_at": _now(),
                                   "last_used": _now(), "stamp": [sha, *_identity(self.dir / sha)]})
        return sha

    def remember(self, key: str, sha256: str) -> None:
        """Record that `key` (e.g. `registry.ollama.ai/library/deepseek-r1:7b manifest`) stands for `sha256`."""
        names = self.root / "names"
        self._make_dirs()
        names.mkdir(mode=0o700, exist_ok=True)
        (names / urllib.parse.quote(key, safe="")).write_text(_digest(sha256) + "\n")

    def recall(self, key: str) -> str | None:
        """The sha256 `key` stood for, while the cache still holds it."""
        try:
            sha = (self.root / "names" / urllib.parse.quote(key, safe="")).read_text().strip()
        except OSError:
            return None
        return sha if HEX.fullmatch(sha) and self.path_for(sha, touch=False) is not None else None

    # ------------------------------------------------------------ fetching

    def _make_dirs(self) -> None:
        """The cache's directories, 0700 when r1fleet creates them (an existing one is left as its owner set it)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def fetch(self, url: str, sha256: str, name: str, progress: Progress | None = None,
              size: int | None = None) -> Path:
        """The entry for `sha256`, downloaded from `url` first when the cache lacks it (resuming a .part).
        It enters the cache only when its sha256 matches; otherwise it is deleted and R1FleetError raised.
        Another r1fleet downloading the same entry into this cache is waited for while its part grows."""
        sha = _digest(sha256)
        hit = self.path_for(sha)
        if hit is not None:
            return hit
        progress = progress or NoProgress()
        try:
            self._make_dirs()
        except OSError as err:
            raise R1FleetError(f"{self.dir}: cannot create ({err.strerror})", fix=DISK_FIX) from None
        data, meta_path, part = self._paths(sha)
        try:  # append: keep what an interrupted run fetched; never through a link someone left as the part
            handle = open(part, "ab", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW, 0o600))
        except OSError as err:
            raise R1FleetError(f"{part}: cannot write ({err.strerror})", fix=DISK_FIX) from None
        with handle:
            self._lock(handle, name, progress)
            hit = self.path_for(sha)
            if hit is not None:  # the other r1fleet finished it while this one waited
                self._drop_empty(part, handle)
                return hit
            urls = list(dict.fromkeys([*(self._meta(sha) or {}).get("urls", []), url]))  # a resumed part: both served it
            meta = {"sha256": sha, "name": name, "urls": urls, "size": size, "fetched_at": None, "last_used": _now()}
            self._write_meta(sha, meta)
            state = Download(hash_file(part), os.lstat(part).st_size, size)
            progress.started(name, size, state.done)
            download(url, name, handle, state, progress, stall_timeout=self.stall_timeout, attempts=self.attempts)
            got = state.hasher.hexdigest()
            if got != sha:
                part.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                raise R1FleetError(f"sha256 mismatch for {url}: expected {sha}, got {got}; the download was deleted, "
                                   "not cached", fix="check that the URL serves the pinned artifact (a mirror of another "
                                   "version?), then fetch again: it starts from scratch")
            # Stamped before the rename (which keeps size, mtime and inode) and renamed under the lock: whoever
            # waits for the lock finds the entry whole and stamped, never hashes it again.
            self._write_meta(sha, {**meta, "size": state.done, "fetched_at": _now(), "stamp": [sha, *_identity(part)]})
            os.replace(part, data)
        progress.finished(name, state.done)
        return data

    @staticmethod
    def _drop_empty(part: Path, handle: BinaryIO) -> None:
        """Remove the empty part this fetch created, when the entry turned out whole (the handle may instead be
        the other r1fleet's part, renamed since into the entry: that is never touched)."""
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            return
        if st.st_ino == os.fstat(handle.fileno()).st_ino and st.st_size == 0:
            part.unlink()

    def _lock(self, handle: BinaryIO, name: str, progress: Progress) -> None:
        """The part's lock; while another r1fleet holds it, wait as long as the part grows (it is downloading),
        and give up with R1FleetError once it has added nothing for the stall timeout."""
        noted, size, moved = False, -1, time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now, grown = time.monotonic(), os.fstat(handle.fileno()).st_size
            if grown != size:
                size, moved = grown, now
            elif now - moved > self.stall_timeout:
                raise R1FleetError(f"{handle.name}: another r1fleet is downloading {name} into the cache and has added "
                                   f"nothing for {self.stall_timeout:g} s", fix="wait for it to finish, or stop it")
            if not noted:
                progress.noted(name, "another r1fleet is downloading it into this cache: waiting for it")
                noted = True
            time.sleep(min(1.0, self.stall_timeout / 4))  # gevent's sleep in a deploy: the other hosts go on
