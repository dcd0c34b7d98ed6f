"""Run a compiled model: its library and weights in a Relax VM, over TVM's paged KV cache.

`KVCache` is a typed handle on the runtime's paged KV cache; `ModelRuntime` prefills and decodes
batches of sequences and returns float32 logits.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm
from safetensors.numpy import load_file
from tvm import relax
from tvm.runtime import ShapeTuple

from mlc_engine.common.config import ModelConfig
from mlc_engine.common.errors import ModelLibraryError
from mlc_engine.engine.compiler import METADATA_FUNCTION
from mlc_engine.engine.model.attention import PAGE_SIZE
from mlc_engine.engine.model.llama import LlamaForCausalLM
from mlc_engine.engine.quantization import to_storage_layout

PARAMS_FILE = "params.safetensors"


def use_threads(num_threads: int | None = None) -> int:
    """Size TVM's CPU thread pool: `num_threads`, else every core this process may run on.

    TVM's own default is half the cores (it assumes two hyper-threads per core), which on this
    kind of machine leaves half the CPU idle. Must run before the first kernel does."""
    count = num_threads or len(os.sched_getaffinity(0))
    os.environ["TVM_NUM_THREADS"] = str(count)
    return count


def _builtin(name: str) -> tvm.ffi.Function:
    return tvm.get_global_func(f"vm.builtin.{name}")


_clear_pool = _builtin("memory_manager.clear")


class KVCache:
    """Sequences live here, by integer id; one forward pass at a time runs between
    `begin_forward` and `end_forward`.

    It mirrors which pages each sequence holds, as TVM's cache lays them out: a sequence's full
    pages may be shared (forks), its partly filled last page never is (a fork inside a page
    copies it). So the engine can count the pages that only parked sequences hold (the prefix
    cache's: `park`), which TVM does not say; the count is kept as sequences come and go, so
    reading it costs nothing."""

    _add = _builtin("kv_state_add_sequence")
    _remove = _builtin("kv_state_remove_sequence")
    _fork = _builtin("kv_state_fork_sequence")
    _begin = _builtin("kv_state_begin_forward")
    _end = _builtin("kv_state_end_forward")
    _free_pages = _builtin("attention_kv_cache_get_num_available_pages")
    _total_length = _builtin("attention_kv_cache_get_total_sequence_length")

    page_size = PAGE_SIZE

    def __init__(self, handle: tvm.runtime.Object):
        self.handle = handle
        self.num_pages = self.free_pages()  # all of them, while the cache is empty
        self.lengths: dict[int, int] = {}  # tokens each sequence holds
        self._pages: dict[int, list[int]] = {}  # page labels (not TVM's ids) of each sequence
        self._next_page = itertools.count()
        self._holders: Counter[int] = Counter()  # page -> the sequences holding it
        self._active: Counter[int] = Counter()  # page -> those of them not parked
        self._parked: set[int] = set()
        self.parked_pages = 0  # pages that only parked sequences hold

    def add_sequence(self, seq_id: int) -> None:
        self._add(self.handle, seq_id)
        self.lengths[seq_id], self._pages[seq_id] = 0, []

    def remove_sequence(self, seq_id: int) -> None:
        self._remove(self.handle, seq_id)
        self._count(self._pages.pop(seq_id), -1, seq_id not in self._parked)
        self._parked.discard(seq_id)
        del self.lengths[seq_id]

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """The child shares the parent's full pages up to `fork_pos` (-1: all of its tokens);
        a partly filled page at `fork_pos` is copied."""
        self._fork(self.handle, parent_id, child_id, fork_pos)
        length = self.lengths[parent_id] if fork_pos == -1 else fork_pos
        shared = self._pages[parent_id][: length // self.page_size]
        copied = [next(self._next_page)] if length % self.page_size else []
        self.lengths[child_id], self._pages[child_id] = length, shared + copied
        self._count(shared + copied, 1, True)

    def park(self, seq_id: int) -> None:
        """`seq_id` is kept only for others to fork from: its pages that no running sequence
        holds count in `parked_pages`. It runs no more forward passes."""
        self._count(self._pages[seq_id], -1, True, holders=False)
        self._parked.add(seq_id)

    def _count(self, pages: list[int], change: int, active: bool, holders: bool = True) -> None:
        """Add `change` holders (active ones if `active`) to each page, keeping `parked_pages`."""
        for page in pages:
            was_parked = self._holders[page] > 0 and self._active[page] == 0
            if holders:
                self._holders[page] += change
            if active:
                self._active[page] += change
            if self._holders[page] == 0:
                del self._holders[page], self._active[page]
                self.parked_pages -= was_parked
            else:
                self.parked_pages += (self._active[page] == 0) - was_parked

    def begin_forward(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        self._begin(self.handle, ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths)))
        for seq_id, length in zip(seq_ids, lengths, strict=True):
            self.lengths[seq_id] += length
            pages = self._pages[seq_id]
            added = -(-self.lengths[seq_id] // self.page_size) - len(pages)
            new = [next(self._next_page) for _ in range(added)]
            pages += new
            self._count(new, 1, True)

    def end_forward(self) -> None:
        self._end(self.handle)

    def free_pages(self) -> int:
        return int(self._free_pages(self.handle))

    def total_sequence_length(self) -> int:
        return int(self._total_length(self.handle))

    def pages_in_use(self) -> int:
        """By the mirror; equals `num_pages - free_pages()` unless the mirror is wrong."""
        return len(self._holders)

    def count_parked_pages(self) -> int:
        """`parked_pages` counted from scratch over every page (slow), to check it."""
        active = {p for s, pages in self._pages.items() if s not in self._parked for p in pages}
        return len({page for s in self._parked for page in self._pages[s]} - active)


class ModelRuntime:
    """A model library and its weights loaded on one device."""

    def __init__(
        self,
        lib_path: Path,
        model_folder: Path,
        device: tvm.runtime.Device,
        num_threads: int | None = None,
    ):
        self.num_threads = use_threads(num_threads)
        self.model_folder = model_folder
        self.config = ModelConfig.load(model_folder)
        self.device = device
        executable = tvm.runtime.load_module(str(lib_path))
        self.vm = relax.VirtualMachine(executable, device)
        column_block, self.size_bounds = self._check_library(lib_path, model_folder)
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]
        try:
            self._decode_one = self.vm["decode_one"]
        except AttributeError:  # a --lib-path library built before decode_one existed
            self._decode_one = self._decode
        self.params = self._load_params(model_folder, column_block)

    def _check_library(self, lib_path: Path, model_folder: Path) -> tuple[int, tuple[int, int]]:
        """Refuse a library built for another model; returns the 4-bit layout it wants and its
        bounds on prefill tokens and decode batch (none in libraries from before them)."""
        built_for = json.loads(str(self.vm[METADATA_FUNCTION]()))
        expected = self.config.architecture_key()
        if built_for["architecture"] != expected:
            mismatched = sorted(
                key for key in expected if built_for["architecture"].get(key) != expected[key]
            )
            raise ModelLibraryError(
                f"model library {lib_path} was built for another model than {model_folder} "
                f"(they differ in {', '.join(mismatched)}); drop --lib-path to compile a "
                "matching one"
            )
        bounds = built_for.get("max_prefill_tokens", 0), built_for.get("max_decode_batch", 0)
        return built_for.get("column_block", 0), bounds  # libraries from before blocks: rows

    def _load_params(self, model_folder: Path, column_block: int) -> list[tvm.runtime.Tensor]:
        """The folder's weights in the definition's order, quantized arrays in the library's
        layout."""
        # Parameter order is the model definition's; building the module (not compiling) gives it.
        names = [name for name, _ in LlamaForCausalLM(self.config, None).named_parameters()]
        stored = load_file(str(model_folder / PARAMS_FILE))
        missing = [name for name in names if name not in stored]
        if missing:
            raise ValueError(f"{model_folder / PARAMS_FILE} lacks parameters: {missing[:5]}")

        def laid_out(name: str) -> np.ndarray:
            if ".q4." not in name and ".q8." not in name:
                return stored[name]
            return to_storage_layout(stored[name], column_block)

        return [tvm.runtime.tensor(laid_out(name), self.device) for name in names]

    def create_kv_cache(
        self,
        max_num_seqs: int,
        max_total_tokens: int,
        prefill_chunk_size: int | None = None,
    ) -> KVCache:
        """A cache for up to `max_num_seqs` sequences and `max_total_tokens` tokens in all, in
        pages of PAGE_SIZE tokens (the compiled attention kernels assume that size)."""
        chunk = prefill_chunk_size or self.config.prefill_chunk_size
        max_tokens, max_batch = self.size_bounds
        if max_tokens and chunk > max_tokens or max_batch and max_num_seqs > max_batch:
            raise ValueError(
                f"the model library runs at most {max_tokens} prefill tokens and {max_batch} "
                f"sequences a step; asked for {chunk} and {max_num_seqs}"
            )
        sizes = (max_num_seqs, max_total_tokens, chunk, PAGE_SIZE, 0)
        return KVCache(self.vm["create_kv_cache"](*(ShapeTuple([size]) for size in sizes)))

    def release_memory(self) -> None:
        """Give the VM's pooled buffers back to the system; the next call allocates what it needs
        again. For an idle engine: the pool keeps a logits buffer for each decode batch size it
        has seen, so without this its memory creeps up as rare batch sizes come along."""
        _clear_pool()
        with contextlib.suppress(OSError, AttributeError):  # glibc only
            # Freed buffers below glibc's mmap threshold stay in the heap unless trimmed.
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def _tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(array, self.device)

    def _wait_for_device(self) -> None:
        """Wait until the device has run what the last VM call queued (a GPU call returns with
        its work queued). Freeing one of the call's input tensors would wait for it too, but
        holding the GIL (Vulkan on lavapipe: 11 s for a prefill, in which the engine's
        heartbeats stopped and its frontend gave it up for dead); a device sync waits without
        it, so a step keeps its inputs until this has returned."""
        if self.device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
            self.device.sync()

    def prefill(
        self,
        kv_cache: KVCache,
        seq_ids: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        all_logits: bool | Sequence[bool] = False,
    ) -> np.ndarray:
        """Append each sequence's tokens in one ragged pass.

        Returns, sequence by sequence, the logits after its last token, or after each of its
        tokens where `all_logits` says so (one flag for all, or one per sequence): rows in
        order, [rows, vocab]."""
        lengths = [len(tokens) for tokens in token_ids]
        if min(lengths) == 0:
            raise ValueError("prefill needs at least one token per sequence")
        every = [all_logits] * len(lengths) if isinstance(all_logits, bool) else all_logits
        flat = np.concatenate([np.asarray(tokens, dtype=np.int32) for tokens in token_ids])
        starts = np.cumsum([0, *lengths[:-1]])
        positions = np.concatenate(
            [
                np.arange(start, start + length) if whole else [start + length - 1]
                for start, length, whole in zip(starts, lengths, every, strict=True)
            ]
        ).astype(np.int32)
        rows = len(positions)
        # The logits are the VM's output, which its pool keeps a buffer for by size: padded to
        # a few sizes (repeating the last position), they take a few buffers, not one per count.
        padded = np.pad(positions, (0, logit_rows_bucket(rows) - rows), mode="edge")
        kv_cache.begin_forward(seq_ids, lengths)
        try:
            inputs = self._tensor(flat), self._tensor(padded)  # kept: see `_wait_for_device`
            logits, _ = self._prefill(*inputs, kv_cache.handle, self.params)
            self._wait_for_device()
        finally:
            kv_cache.end_forward()
        return _host_view(logits)[0][:rows]

    def decode(
        self, kv_cache: KVCache, seq_ids: Sequence[int], token_ids: Sequence[int]
    ) -> np.ndarray:
        """Append one token to each sequence; returns logits [len(seq_ids), vocab]."""
        ids = self._tensor(np.asarray(token_ids, dtype=np.int32))
        kv_cache.begin_forward(seq_ids, [1] * len(seq_ids))
        try:
            decode = self._decode_one if len(seq_ids) == 1 else self._decode
            logits, _ = decode(ids, kv_cache.handle, self.params)
            self._wait_for_device()
        finally:
            kv_cache.end_forward()
        return _host_view(logits)[:, 0, :]


def logit_rows_bucket(rows: int) -> int:
    """The logit rows a prefill computes for `rows` wanted: a multiple of 8 up to 32, then a
    power of two (about ten sizes in all)."""
    if rows <= 32:
        return -(-rows // 8) * 8
    return 1 << (rows - 1).bit_length()


def _host_view(tensor: tvm.runtime.Tensor) -> np.ndarray:
    """A CPU tensor's data as a NumPy array without a copy (it keeps the tensor alive, and the
    VM allocates its outputs afresh each call); other devices' tensors are copied. The logits
    of a 16-sequence decode are 3 MB: copying them was about 1% of the step."""
    if tensor.device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
        return np.from_dlpack(tensor)
    return tensor.numpy()
