"""One content-addressed store for everything headstart remembers between runs.

Every cache (embeddings, backbones, head fits, exported graphs, metrics, pictures, Grad-CAM overlays, thumbnails) is a ``Store``: a
folder whose entries are named by a key, the sha256 of everything the entry depends on (``key(...)``). An entry
is one or more files written atomically, records last, so a reader finds a whole entry or none. One policy for
every store:

* an absent, partial, damaged or unreadable entry reads as ``None``: the caller computes it again;
* a store that cannot be written (read-only folder, permissions) costs only the recomputation next time, said
  once per folder in the log; a full disk is an error that says so (``files.atomic_path``), since every later
  write would fail too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from . import config
from .files import atomic_path

log = logging.getLogger("headstart")

T = TypeVar("T")
FORMAT = 1  # in every key: bump it and every store starts afresh
_UNWRITABLE: set[Path] = set()  # folders already reported as unwritable in this process


def key(*parts: Any, arrays: tuple[np.ndarray, ...] = (), length: int = 24) -> str:
    """The key recipe of every store: JSON of ``parts`` (sorted keys, anything else as its ``str``) and the raw
    bytes of ``arrays``, hashed with sha256."""
    h = hashlib.sha256(json.dumps([FORMAT, *parts], sort_keys=True, default=str).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:length]


@dataclass(frozen=True)
class Store:
    """A folder of entries: ``<root>/<key><suffix>``, or ``<root>/<key[:2]>/<key><suffix>`` when ``sharded``
    (for stores with one entry per photo, so no folder grows past a few thousand files)."""

    root: Path
    sharded: bool = False

    def path(self, name: str, suffix: str = "") -> Path:
        return (self.root / name[:2] if self.sharded else self.root) / f"{name}{suffix}"

    def read(self, name: str, suffix: str, reader: Callable[[Path], T]) -> T | None:
        """``reader(path)`` of the entry, or ``None`` when it is absent or cannot be read as expected."""
        path = self.path(name, suffix)
        try:
            return reader(path)
        except Exception:  # noqa: BLE001 - absent, partial or damaged: the one policy is to compute it again
            return None

    def write(self, name: str, writers: dict[str, Callable[[Path], None]]) -> bool:
        """Write the entry's files atomically, in the order given (records last); ``False`` when the store cannot
        be written. Each writer fills the temporary path it is given."""
        try:
            for suffix, writer in writers.items():
                with atomic_path(self.path(name, suffix)) as tmp:
                    writer(tmp)
            return True
        except OSError as e:
            if self.root not in _UNWRITABLE:
                _UNWRITABLE.add(self.root)
                log.warning("cannot write the cache folder %s (%s): its entries will be computed again next run",
                            self.root, e.strerror or e)
            return False

    def read_json(self, name: str) -> Any | None:
        return self.read(name, ".json", lambda p: json.loads(p.read_text()))

    def write_json(self, name: str, value: Any, before: dict[str, Callable[[Path], None]] | None = None) -> bool:
        """The JSON record, written after the files in ``before`` (an entry's arrays before the record naming them)."""
        data = json.dumps(value, default=str).encode()
        return self.write(name, {**(before or {}), ".json": lambda p: p.write_bytes(data)})

    def read_bytes(self, name: str, suffix: str) -> bytes | None:
        return self.read(name, suffix, Path.read_bytes)

    def write_bytes(self, name: str, suffix: str, data: bytes) -> bool:
        return self.write(name, {suffix: lambda p: p.write_bytes(data)})


def store(kind: str, cache_dir: str | os.PathLike | None = None, sharded: bool = False) -> Store:
    """The store ``kind`` (``features``, ``backbones``, ``heads``, ``onnx``, ``overlays``) under the cache folder
    (``--cache-dir``, ``$HEADSTART_CACHE`` or ``~/.cache/headstart``)."""
    return Store(config.cache_dir(cache_dir) / kind, sharded)
