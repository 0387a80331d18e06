"""The V2 system shared-memory extension: tensors in POSIX shared memory instead of the HTTP body.

A client on the same machine creates a region (`/dev/shm/<key>`, e.g. with
`tritonclient.utils.shared_memory`), registers it under a name, and names it in an infer request's input or
output parameters (`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`): the server
reads the inputs from, and writes the outputs into, the mapped region, so a 600 KB image never crosses the
socket.

Why it is off by default (`--enable-shared-memory`): registering makes the server open a shared-memory object
by the name a client gives. Keys are therefore plain names inside /dev/shm (no directories, no `..`), regions
must lie within the object, and with API keys every call needs one. The mapping lives in one server process,
so the extension cannot be combined with `--http-workers` above 1 (a region registered with one process would
be unknown to the others)."""

from __future__ import annotations

import mmap
import os
import re
import threading
from dataclasses import dataclass

from inferforge.serve.engine.errors import InvalidRequest, ModelNotFound

_KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")
SHM_ROOT = "/dev/shm"


@dataclass
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SharedMemoryRegions:
    """The regions registered with one server process, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: object, offset: object, byte_size: object) -> None:
        """Map `byte_size` bytes at `offset` of the shared-memory object `key`; a clear 400 for every bad
        value, 400 too when the name is taken (Triton's rule: unregister first)."""
        if not isinstance(key, str) or not _KEY.match(key) or key.strip("/") in (".", ".."):
            raise InvalidRequest(
                f"shared memory key {key!r} must be a plain name of an object in {SHM_ROOT} "
                "(letters, digits, '_', '-', '.'), as tritonclient.utils.shared_memory creates them"
            )
        for what, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"shared memory region {name!r}: {what} must be a non-negative integer")
        assert isinstance(offset, int) and isinstance(byte_size, int)
        if byte_size == 0:
            raise InvalidRequest(f"shared memory region {name!r}: byte_size must be positive")
        path = os.path.join(SHM_ROOT, key.strip("/"))
        with self._lock:
            if name in self._regions:
                raise InvalidRequest(
                    f"shared memory region {name!r} is already registered; unregister it first"
                )
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as exc:
                raise InvalidRequest(f"shared memory key {key!r} cannot be opened: {exc.strerror}") from None
            try:
                size = os.fstat(fd).st_size
                if offset + byte_size > size:
                    raise InvalidRequest(
                        f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} runs past "
                        f"the end of {key!r} ({size} bytes)"
                    )
                mapping = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._regions[name] = _Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str | None = None) -> None:
        """One region, or all of them when `name` is None; unknown names are not an error (as in Triton)."""
        with self._lock:
            names = list(self._regions) if name is None else [name]
            for n in names:
                region = self._regions.pop(n, None)
                if region is not None:
                    region.mapping.close()

    def status(self, name: str | None = None) -> list[dict]:
        with self._lock:
            if name is None:
                return [r.status() for r in self._regions.values()]
            if name not in self._regions:
                raise ModelNotFound(f"shared memory region {name!r} is not registered")
            return [self._regions[name].status()]

    def _span(self, tensor: str, name: object, offset: object, size: int) -> tuple[_Region, int]:
        """The region and the absolute start of `size` bytes at `offset` inside it."""
        if not isinstance(name, str) or name not in self._regions:
            raise InvalidRequest(f"tensor {tensor!r}: shared memory region {name!r} is not registered")
        if offset is None:
            offset = 0
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidRequest(f"tensor {tensor!r}: shared_memory_offset must be a non-negative integer")
        region = self._regions[name]
        if offset + size > region.byte_size:
            raise InvalidRequest(
                f"tensor {tensor!r}: {size} bytes at offset {offset} do not fit region {name!r} "
                f"({region.byte_size} bytes)"
            )
        return region, region.offset + offset

    def read(self, tensor: str, name: object, offset: object, size: int) -> bytes:
        """A copy of the bytes (the client may rewrite its region as soon as it has the answer)."""
        with self._lock:
            region, start = self._span(tensor, name, offset, size)
            return region.mapping[start : start + size]

    def write(self, tensor: str, name: object, offset: object, data: bytes) -> None:
        with self._lock:
            region, start = self._span(tensor, name, offset, len(data))
            region.mapping[start : start + len(data)] = data
