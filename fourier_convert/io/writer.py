"""Atomic, streaming writer of Hugging Face safetensors checkpoints.

:class:`CheckpointWriter` is a context manager. Everything is written into a hidden temporary folder
beside the target (``.NAME.partial-XXXX``); :meth:`CheckpointWriter.commit` checks that every planned
tensor was written and publishes the folder with one ``rename``. Leaving the ``with`` block without a
commit (an error, Ctrl-C) deletes the temporary folder, so a target that exists is always complete.

Tensor bytes arrive two ways: byte ranges copied from input files by a background thread (kernel-side
``copy_file_range`` where available, so untouched tensors are never decoded), and tensors computed by the
caller, written with positioned writes at their planned offsets. The two run concurrently.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from fourier_convert.errors import DiskSpaceError, InputFileError, OutputError, UsageError
from fourier_convert.host import fmt_bytes
from fourier_convert.io.checkpoint import INDEX_NAME, SINGLE_NAME
from fourier_convert.io.progress import ByteProgress
from fourier_convert.io.safetensors_file import DTYPE_SIZES, SafetensorsFile

_COPY_CHUNK = 256 * 1024 * 1024


_INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP until the block is done, then act on one that came (as KeyboardInterrupt,
    unless the block is already raising). Only the main thread handles signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {}
    for sig in _INTERRUPTS:
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_IGN, None):
            continue
        previous[sig] = handler
        signal.signal(sig, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if came:
        raise KeyboardInterrupt


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class ShardLayout:
    """Where each tensor of one output file goes.

    Attributes:
        filename: File name inside the output folder.
        header: The full header (length prefix included).
        offsets: Tensor name -> absolute byte offset of its data.
        specs: The tensors, in file order.
    """

    filename: str
    header: bytes
    offsets: dict[str, int]
    specs: list[TensorSpec]

    @property
    def size(self) -> int:
        return len(self.header) + sum(s.nbytes for s in self.specs)


def build_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """Serialise a safetensors header for tensors stored contiguously in the given order.

    Returns:
        The header bytes (8-byte length prefix, JSON padded with spaces to a multiple of 8) and each
        tensor's absolute data offset.

    Example:
        >>> header, offsets = build_header([TensorSpec("w", "F32", (2, 2))], {"format": "pt"})
        >>> len(header) % 8, offsets["w"] == len(header)
        (0, True)
    """
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = metadata
    rel: dict[str, int] = {}
    pos = 0
    for spec in specs:
        entries[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
        rel[spec.name] = pos
        pos += spec.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    header = len(body).to_bytes(8, "little") + body
    return header, {k: v + len(header) for k, v in rel.items()}


def layout_shards(
    groups: Sequence[Sequence[TensorSpec]],
    *,
    metadata: dict[str, str] | None = None,
    mirror: Sequence[SafetensorsFile | None] | None = None,
    names: Sequence[str] | None = None,
) -> list[ShardLayout]:
    """Lay out output shards, reusing an input shard's header byte for byte when nothing in it changes.

    Args:
        groups: The tensors of each output shard, in file order.
        metadata: ``__metadata__`` for new headers (``{"format": "pt"}`` by default).
        mirror: For each group, the input shard it mirrors (or None). When the group has exactly the
            input's names, dtypes, shapes and offsets, the input header is reused verbatim.
        names: File names (default ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``).

    Returns:
        One layout per group.
    """
    count = len(groups)
    layouts = []
    for i, specs in enumerate(groups):
        name = names[i] if names else SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        header, offsets = build_header(specs, metadata if metadata is not None else {"format": "pt"})
        source = mirror[i] if mirror else None
        if source is not None and _same_table(source, specs, offsets, len(header)):
            header = source.header_bytes
            offsets = {s.name: source.tensors[s.name].start for s in specs}
        layouts.append(ShardLayout(name, header, offsets, list(specs)))
    return layouts


def _same_table(src: SafetensorsFile, specs: Sequence[TensorSpec], offsets: dict[str, int], hlen: int) -> bool:
    if set(src.tensors) != {s.name for s in specs}:
        return False
    for spec in specs:
        t = src.tensors[spec.name]
        if t.dtype != spec.dtype or t.shape != spec.shape:
            return False
        if t.start - src.data_start != offsets[spec.name] - hlen:
            return False
    return True


def plan_groups(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own).

    Example:
        >>> s = [TensorSpec(str(i), "F32", (10,)) for i in range(5)]
        >>> [len(g) for g in plan_groups(s, 100)]
        [2, 2, 1]
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


@dataclass(frozen=True)
class RangeCopy:
    """Copy ``length`` bytes from ``src`` at ``src_offset`` to output file ``dst`` at ``dst_offset``."""

    src: Path
    src_offset: int
    dst: str
    dst_offset: int
    length: int
    tensors: tuple[str, ...] = field(default=())


def coalesce(copies: Iterable[RangeCopy]) -> list[RangeCopy]:
    """Merge copies that are contiguous in both source and destination into single ranges.

    Linear in the number of copies (after sorting): each run's tensor names are gathered once (200,000
    zero-size tensors in one shard: 0.2 s here).

    Example:
        >>> a = RangeCopy(Path("s"), 0, "d", 8, 4, ("a",))
        >>> b = RangeCopy(Path("s"), 4, "d", 12, 4, ("b",))
        >>> coalesce([b, a])
        [RangeCopy(src=PosixPath('s'), src_offset=0, dst='d', dst_offset=8, length=8, tensors=('a', 'b'))]
    """
    runs: list[tuple[RangeCopy, int, list[str]]] = []  # first copy of the run, its length, its tensors
    for c in sorted(copies, key=lambda c: (c.dst, c.dst_offset)):
        if runs:
            first, length, names = runs[-1]
            if (
                first.dst == c.dst
                and first.src == c.src
                and first.src_offset + length == c.src_offset
                and first.dst_offset + length == c.dst_offset
            ):
                names.extend(c.tensors)
                runs[-1] = (first, length + c.length, names)
                continue
        runs.append((c, c.length, list(c.tensors)))
    return [RangeCopy(f.src, f.src_offset, f.dst, f.dst_offset, length, tuple(names)) for f, length, names in runs]


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int, stop: threading.Event) -> int:
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < length:
        if stop.is_set():
            return done
        want = min(_COPY_CHUNK, length - done)
        k = 0
        if use_cfr:
            try:
                k = os.copy_file_range(src_fd, dst_fd, want, src_off + done, dst_off + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            chunk = os.pread(src_fd, min(want, 16 * 1024 * 1024), src_off + done)
            k = os.pwrite(dst_fd, chunk, dst_off + done) if chunk else 0
        if k == 0:
            raise InputFileError(f"fd {src_fd}", "input ended early while copying", "re-download the input")
        done += k
    return done


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``dst`` byte for byte, copying only its data and leaving its holes holes: a 20 GB
    sparse file beside the weights took 41 s and 21 GB of disk as a dense copy.

    Falls back to a plain copy where the file system cannot say where the data is (no ``SEEK_DATA``).

    Example:
        >>> copy_sparse(Path("fixtures/llama/base/config.json"), Path("/tmp/config-copy.json"))  # doctest: +SKIP
    """
    if not hasattr(os, "SEEK_DATA"):
        shutil.copyfile(src, dst)
        return
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        never = threading.Event()
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                    break
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # the file system cannot tell: copy it all
                    start, end = pos, size
                else:
                    raise
            else:
                end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            _copy_range(fi.fileno(), fo.fileno(), start, start, end - start, never)
            pos = end
        fo.truncate(size)


class CheckpointWriter:
    """Write a model folder atomically: complete and verified, or not at all.

    Args:
        out: Target folder. It must not exist, be empty, or ``overwrite`` must be True.
        overwrite: Replace an existing non-empty target (only once the new output is complete).
        progress: Byte progress sink (None for silence).
        durable: fsync every file before publishing (default). False suits scratch outputs that are read
            back at once and deleted: the rename still publishes only complete files, but a power cut may lose
            them.

    Example:
        >>> with CheckpointWriter(Path("merged")) as w:  # doctest: +SKIP
        ...     w.begin(layouts)
        ...     w.copy(ranges)
        ...     w.write_tensor("model.safetensors", "lm_head.weight", tensor_bytes)
        ...     w.write_file("config.json", b"{}")
        ...     w.commit(index_metadata={})
    """

    def __init__(
        self, out: Path, *, overwrite: bool = False, progress: ByteProgress | None = None, durable: bool = True
    ) -> None:
        self.given = Path(out)
        self.out = output_target(self.given)  # where it publishes (a link's target)
        self.overwrite = overwrite
        self.durable = durable
        self.progress = progress
        self.temp: Path | None = None
        self._layouts: dict[str, ShardLayout] = {}
        self._fds: dict[str, int] = {}
        self._pending: set[tuple[str, str]] = set()
        self._sizes: dict[tuple[str, str], int] = {}
        self._parts: dict[tuple[str, str], int] = {}  # bytes written so far of tensors written in parts
        self._jobs: queue.Queue[RangeCopy | None] = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.committed = False
        self.bytes_written = 0
        self._need = 0
        self._created: list[Path] = []

    # -- set-up -----------------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        # Nothing is created here: folders appear in begin(), inside the with-block, so that an interrupt
        # at any moment is followed by __exit__ and its clean-up.
        check_output_target(self.given, self.overwrite)
        return self

    def _make_temp(self) -> Path:
        parent = self.out.parent if str(self.out.parent) else Path(".")
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        temp = parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"
        self._created = missing  # innermost first: removed again if nothing is published
        self.temp = temp  # set before mkdir: __exit__ removes it if it exists
        try:
            parent.mkdir(parents=True, exist_ok=True)
            temp.mkdir()
        except OSError as exc:
            raise OutputError(
                str(self.out), f"cannot create the output folder ({exc.strerror})", "check permissions"
            ) from None
        return temp

    def begin(self, layouts: Sequence[ShardLayout], extra_bytes: int = 0) -> None:
        """Create the temporary folder, check free space, create every output file at full size and write
        the headers.

        Raises:
            OutputError: The folder cannot be created.
            DiskSpaceError: Not enough free space for all files (the message says how much is needed).
        """
        self._make_temp()
        assert self.temp is not None
        need = sum(lay.size for lay in layouts) + extra_bytes
        self._need = need
        free = shutil.disk_usage(self.temp).free
        if need > free:
            raise DiskSpaceError(
                str(self.out),
                f"needs {fmt_bytes(need)} of free disk space, {fmt_bytes(free)} available",
                "free some space",
            )
        for lay in layouts:
            path = self.temp / lay.filename
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[lay.filename] = fd
            self._layouts[lay.filename] = lay
            self._guard(lambda fd=fd, lay=lay: _reserve(fd, lay.size))
            self._guard(lambda fd=fd, lay=lay: os.pwrite(fd, lay.header, 0))
            for spec in lay.specs:
                self._pending.add((lay.filename, spec.name))
                self._sizes[(lay.filename, spec.name)] = spec.nbytes
        self._thread = threading.Thread(target=self._run_copies, name="fourier-convert-copy", daemon=True)
        self._thread.start()

    # -- data -------------------------------------------------------------------------------------
    def copy(self, ranges: Iterable[RangeCopy]) -> None:
        """Queue byte-range copies for the background thread (tensors listed in each range count as written)."""
        for r in ranges:
            self._jobs.put(r)

    def write_tensor(self, filename: str, name: str, data: bytes | bytearray | memoryview, *, at: int = 0) -> None:
        """Write one tensor's bytes at its planned offset, whole or in parts.

        Args:
            filename: The shard.
            name: The tensor.
            data: Its bytes, or the part of them starting at byte ``at``.
            at: Where ``data`` starts inside the tensor: parts are written in order, each starting where the
                last ended; the tensor counts as written once every byte is.

        Raises:
            OutputError: The bytes do not fit the planned tensor, or the write failed.
        """
        expected = self._sizes[(filename, name)]
        view = memoryview(data).cast("B")
        so_far = self._parts.get((filename, name), 0)
        if at != so_far or at + len(view) > expected:
            raise OutputError(
                name,
                f"computed bytes {at}..{at + len(view)}, the plan says {expected} in all (parts come in order; "
                f"{so_far} written)",
                "report this bug",
            )
        self._raise_copy_error()
        fd = self._fds[filename]
        offset = self._layouts[filename].offsets[name]
        self._guard(lambda: _pwrite_all(fd, view, offset + at))
        with self._lock:
            done = self._parts.pop((filename, name), 0) + len(view)
            if done < expected:  # more parts to come (commit refuses a tensor left incomplete)
                self._parts[(filename, name)] = done
            else:
                self._pending.discard((filename, name))
            self.bytes_written += len(view)
        if self.progress:
            self.progress.advance(len(view))

    def write_file(self, name: str, data: bytes) -> None:
        """Write a small file (config, index, report) into the output folder."""
        assert self.temp is not None
        self._guard(lambda: (self.temp / name).write_bytes(data))  # type: ignore[operator]

    def copy_file(self, src: Path, name: str | None = None) -> None:
        """Copy an input file (tokenizer, generation config, any other file of the model) into the output folder,
        holes kept (:func:`copy_sparse`)."""
        assert self.temp is not None
        self._guard(lambda: copy_sparse(src, self.temp / (name or src.name)))  # type: ignore[operator]

    # -- finish -----------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until all queued copies are done; re-raise a copy error."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise_copy_error()

    def commit(self, *, index_metadata: dict[str, Any] | None = None, index: bool = True) -> Path:
        """Finish the files, write the shard index (when sharded and ``index``) and publish the folder.

        Args:
            index_metadata: Extra ``metadata`` of ``model.safetensors.index.json``.
            index: False for outputs that are not models (a PEFT adapter has no index: its weights file is
                ``adapter_model.safetensors``, and an index beside it would be a model index in an adapter folder).

        Raises:
            OutputError: A planned tensor was never written (a bug), or the rename failed.
        """
        assert self.temp is not None
        self.wait()
        if self._pending:
            filename, name = sorted(self._pending)[0]
            raise OutputError(
                f"{filename}:{name}", f"{len(self._pending)} planned tensors were not written", "report this bug"
            )
        for filename, fd in self._fds.items():
            if self.durable:  # on disk before the rename publishes them; skipped for scratch outputs
                os.fsync(fd)
            size = os.fstat(fd).st_size
            if size != self._layouts[filename].size:
                raise OutputError(
                    filename, f"is {size} bytes, planned {self._layouts[filename].size}", "report this bug"
                )
        self._close_fds()
        # transformers finds a weights file without an index only under the single-file name (a base saved as
        # model-00001-of-00001.safetensors needs its index)
        if index and self._layouts and list(self._layouts) != [SINGLE_NAME]:
            weight_map = {s.name: lay.filename for lay in self._layouts.values() for s in lay.specs}
            total = sum(s.nbytes for lay in self._layouts.values() for s in lay.specs)
            doc = {
                "metadata": {**(index_metadata or {}), "total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            self.write_file(INDEX_NAME, (json.dumps(doc, indent=2) + "\n").encode())
        self._publish()
        self.committed = True
        return self.out

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _interrupts_deferred():  # a second Ctrl-C must not cut the clean-up short (a .partial folder was left)
            self._stop.set()
            if self._thread is not None and self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join()
            self._close_fds()
            if not self.committed and self.temp is not None and self.temp.exists():
                shutil.rmtree(self.temp, ignore_errors=True)
            if not self.committed:
                for folder in self._created:
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only if still empty

    # -- internals --------------------------------------------------------------------------------
    def _run_copies(self) -> None:
        src_fds: dict[Path, int] = {}
        unflushed: set[str] = set()
        try:
            while not self._stop.is_set():
                if unflushed and self.durable and self._jobs.empty():
                    # Nothing queued: write the copied bytes back now, while the main thread computes, so that
                    # commit's fsync only has the computed tensors left to write.
                    for name in sorted(unflushed):
                        self._guard(lambda name=name: os.fdatasync(self._fds[name]))
                    unflushed.clear()
                job = self._jobs.get()
                if job is None:
                    return
                fd = src_fds.get(job.src)
                if fd is None:
                    fd = src_fds[job.src] = os.open(job.src, os.O_RDONLY)
                done = self._guard(
                    lambda job=job, fd=fd: _copy_range(
                        fd, self._fds[job.dst], job.src_offset, job.dst_offset, job.length, self._stop
                    )
                )
                unflushed.add(job.dst)
                with self._lock:
                    for name in job.tensors:
                        self._pending.discard((job.dst, name))
                    self.bytes_written += done
                if self.progress:
                    self.progress.advance(done)
        except BaseException as exc:  # handed to the main thread by _raise_copy_error
            self._error = exc
        finally:
            for fd in src_fds.values():
                os.close(fd)

    def _raise_copy_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    str(self.out),
                    f"disk full while writing (the output needs {fmt_bytes(self._need)})",
                    "free some space and retry",
                ) from None
            raise OutputError(str(self.out), f"write failed ({exc.strerror or exc})", "check the output disk") from None

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}

    def _publish(self) -> None:
        assert self.temp is not None
        old: Path | None = None
        if self.out.is_symlink() or self.out.exists():
            empty = self.out.is_dir() and not any(self.out.iterdir())
            if empty and not self.out.is_symlink():
                self.out.rmdir()
            elif not empty and not self.overwrite:
                # checked empty at the start: something (another run?) wrote there meanwhile; never replace it
                raise OutputError(
                    str(self.out),
                    "appeared or filled up while this run was writing (another run?); nothing was published",
                    "choose another --out or pass --overwrite",
                )
            else:
                old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                self.out.rename(old)
        self.temp.rename(self.out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file
                old.unlink()


def output_target(out: Path) -> Path:
    """Where an ``--out`` path really publishes: a symbolic link is followed (all the way, even when it dangles),
    so the output lands in the folder the link names and the link stays as it is.

    Example:
        >>> output_target(Path("merged")) == Path("merged")  # not a link: unchanged
        True
    """
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def check_output_target(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite`` (a link is judged by
    what it points to, :func:`output_target`).

    Raises:
        OutputError: The target cannot be used.
    """
    try:
        out.resolve()
    except (RuntimeError, OSError):  # RuntimeError from Python 3.11's resolve() on a loop
        raise OutputError(str(out), "is a symbolic link loop", "remove the link or choose another --out") from None
    target = output_target(out)
    name = str(out) if target == out else f"{out} (a link to {target})"
    if target.exists():
        if not target.is_dir():
            raise OutputError(name, "exists and is not a folder", "choose another --out")
        if any(target.iterdir()) and not overwrite:
            raise OutputError(name, "exists and is not empty", "choose another --out or pass --overwrite")


def refuse_input_as_output(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that is, contains, or lies inside an input folder (publishing replaces it).

    Raises:
        UsageError: ``out`` overlaps one of ``inputs``.
    """
    target = out.resolve()
    for folder in inputs:
        src = folder.resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise UsageError("--out", f"{out} overlaps the input folder {folder}", "write the output to another folder")


def _reserve(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate") and size > 0:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
