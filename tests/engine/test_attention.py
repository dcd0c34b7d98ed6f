"""Our CPU attention kernels (`model/attention.py`): in compiled models against the NumPy
reference over long, chunked and batched sequences, and alone against a NumPy attention,
edge cases included (empty caches, fully masked queries, partial pages)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import reference
import tvm

from mlc_engine.engine.model.attention import (
    PAGE_SIZE,
    attention_decode_paged,
    attention_prefill_paged,
    attention_prefill_ragged,
)
from mlc_engine.engine.model.kv_cache import kv_append


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, length).tolist()


@pytest.mark.parametrize(
    ("quantization", "variant", "tolerance"),
    [("q0f32", "llama", 1e-4), ("q0f32", "qwen2", 1e-4), ("q0f32", "llama3-rope", 1e-4),
     ("q0f16", "llama", 2e-2)],
)  # fmt: skip
def test_long_prompt_in_chunks_then_decodes_matches_reference(
    tiny_model: Callable, quantization: str, variant: str, tolerance: float
) -> None:
    # The second chunk attends to its own tokens (ragged kernel) and to the first chunk in the
    # cache (paged prefill kernel), merged by lse; the decodes read 300+ tokens of pages.
    model = tiny_model(quantization, variant)
    runtime = model.runtime
    tokens = _prompt(303, seed=1)
    expected = reference.forward(model.hf_weights, model.config, tokens)
    kv = runtime.create_kv_cache(1, 1024, 256)
    kv.add_sequence(0)
    first = runtime.prefill(kv, [0], [tokens[:100]], all_logits=True)
    second = runtime.prefill(kv, [0], [tokens[100:300]], all_logits=True)
    decodes = [runtime.decode(kv, [0], [token])[0] for token in tokens[300:]]
    assert _relative_error(first, expected[:100]) < tolerance
    assert _relative_error(second, expected[100:300]) < tolerance
    assert _relative_error(np.stack(decodes), expected[300:]) < tolerance


def test_batch_of_new_and_continued_sequences_matches_reference(tiny_model: Callable) -> None:
    model = tiny_model("q0f32")
    runtime = model.runtime
    kv = runtime.create_kv_cache(4, 1024, 256)
    # Sequence 0 has 37 tokens in the cache before the batch; 1-3 start empty.
    history = _prompt(37, seed=2)
    kv.add_sequence(0)
    runtime.prefill(kv, [0], [history])
    chunks = [_prompt(length, seed=3 + i) for i, length in enumerate((20, 1, 130, 16))]
    for seq_id in (1, 2, 3):
        kv.add_sequence(seq_id)
    logits = runtime.prefill(kv, [0, 1, 2, 3], chunks, all_logits=True)
    steps = [_prompt(4, seed=10 + seq_id) for seq_id in range(4)]
    decodes = [runtime.decode(kv, [0, 1, 2, 3], [s[i] for s in steps]) for i in range(4)]
    start = 0
    for seq_id, chunk in enumerate(chunks):
        before = history if seq_id == 0 else []
        expected = reference.forward(model.hf_weights, model.config, before + chunk + steps[seq_id])
        got = logits[start : start + len(chunk)]
        start += len(chunk)
        assert _relative_error(got, expected[len(before) : len(before) + len(chunk)]) < 1e-4
        decoded = np.stack([step[seq_id] for step in decodes])
        assert _relative_error(decoded, expected[-4:]) < 1e-4


def test_prefill_on_a_forked_sequence_matches_reference(tiny_model: Callable) -> None:
    # The child's cache is a shared prefix plus its own pages: attention runs per depth.
    model = tiny_model("q0f32")
    runtime = model.runtime
    kv = runtime.create_kv_cache(4, 1024, 256)
    prompt, parent_more, child_more = _prompt(40, 5), _prompt(9, 6), _prompt(23, 7)
    kv.add_sequence(0)
    runtime.prefill(kv, [0], [prompt])
    kv.fork_sequence(0, 1, 35)
    logits = runtime.prefill(kv, [0, 1], [parent_more, child_more], all_logits=True)
    parent = reference.forward(model.hf_weights, model.config, prompt + parent_more)
    child = reference.forward(model.hf_weights, model.config, prompt[:35] + child_more)
    assert _relative_error(logits[:9], parent[40:]) < 1e-4
    assert _relative_error(logits[9:], child[35:]) < 1e-4


# The kernels alone, against attention in NumPy: GQA of 3 query heads per kv head.
H_KV, H_Q, D = 2, 6, 16
TARGET = tvm.target.Target({"kind": "llvm"})


def _attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, causal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One sequence's output and base-2 lse (-5e4 where a query sees no key), as TVM's
    kernels define them."""
    rows, kv_len = q.shape[0], keys.shape[0]
    group = H_Q // H_KV
    out, lse = np.zeros(q.shape), np.full(q.shape[:2], -5e4)
    for r in range(rows):
        visible = min(max(kv_len - rows + r + 1, 0), kv_len) if causal else kv_len
        for h in range(H_Q if visible else 0):
            scores = keys[:visible, h // group] @ q[r, h] * D**-0.5 * np.log2(np.e)
            weights = np.exp2(scores - scores.max())
            out[r, h] = weights @ values[:visible, h // group] / weights.sum()
            lse[r, h] = scores.max() + np.log2(weights.sum())
    return out, lse


def _run(kernel: tvm.tirx.PrimFunc, arrays: list, scalars: list, rows: int) -> tuple:
    output = tvm.runtime.tensor(np.zeros((rows, H_Q, D), np.float32))
    lse = tvm.runtime.tensor(np.zeros((rows, H_Q), np.float32))
    tvm.compile(kernel, TARGET)(*[tvm.runtime.tensor(a) for a in arrays], output, lse, *scalars)
    return output.numpy(), lse.numpy()


class PagedCache:
    """Random keys and values of several sequences in shuffled pages, as the runtime lays
    them out: pages [n, 2 (k/v), H_KV, PAGE_SIZE, D], a page table, last-page lengths."""

    def __init__(self, lengths: list[int], rng: np.random.Generator):
        counts = [-(-length // PAGE_SIZE) for length in lengths]
        self.pages = rng.standard_normal((sum(counts) + 2, 2, H_KV, PAGE_SIZE, D), np.float32)
        self.values = rng.permutation(len(self.pages))[: sum(counts)].astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        self.last_len = np.array([(n - 1) % PAGE_SIZE + 1 if n else 0 for n in lengths], np.int32)
        self.lengths = lengths

    def sequence(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence b's keys and values, [length, H_KV, D] each."""
        held = self.pages[self.values[self.indptr[b] : self.indptr[b + 1]]]
        rows = held.transpose(0, 3, 1, 2, 4).reshape(-1, 2, H_KV, D)[: self.lengths[b]]
        return rows[:, 0], rows[:, 1]

    def arrays(self) -> list[np.ndarray]:
        return [self.pages, self.indptr, self.values, self.last_len]


def _indptr(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


# The prefill kernels' rows of 4 and 2 multiply-add chains (16 and 8 vector lanes).
@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("causal", [0, 1])
def test_ragged_prefill_kernel_matches_numpy(causal: int, lanes: int) -> None:
    rng = np.random.default_rng(0)
    # 3 query heads a kv head: 21, 3, 120 and 48 rows, in whole and partial runs of 32.
    lengths = [7, 1, 40, 16]
    indptr, rows = _indptr(lengths), sum(lengths)
    q = rng.standard_normal((rows, H_Q, D), np.float32)
    k, v = (rng.standard_normal((rows, H_KV, D), np.float32) for _ in range(2))
    zeros = [np.zeros(rows, np.int32), np.zeros(len(lengths), np.int32)]
    kernel = attention_prefill_ragged(H_KV, H_Q, D, D, "float32", lanes)
    output, lse = _run(
        kernel, [q, indptr, k, v, indptr, *zeros], [causal, 0, 1.0, 1e4, D**-0.5], rows
    )
    for b in range(len(lengths)):
        span = slice(indptr[b], indptr[b + 1])
        want_out, want_lse = _attention(q[span], k[span], v[span], bool(causal))
        np.testing.assert_allclose(output[span], want_out, atol=2e-6)
        np.testing.assert_allclose(lse[span], want_lse, atol=1e-5)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_kernel_matches_numpy(causal: int, lanes: int) -> None:
    # An empty cache, a cache shorter than the queries (fully masked when causal), partial pages.
    rng = np.random.default_rng(1)
    cache = PagedCache([20, 0, 5, 33], rng)
    q_lengths = [3, 5, 9, 40]
    indptr, rows = _indptr(q_lengths), sum(q_lengths)
    q = rng.standard_normal((rows, H_Q, D), np.float32)
    zeros = [np.zeros(len(q_lengths), np.int32), np.zeros(rows, np.int32)]
    kernel = attention_prefill_paged(H_KV, H_Q, D, "float32", lanes)
    arrays = [q, indptr, *cache.arrays(), *zeros]
    output, lse = _run(kernel, arrays, [causal, 0, 1.0, 1e4, D**-0.5], rows)
    for b in range(len(q_lengths)):
        span = slice(indptr[b], indptr[b + 1])
        want_out, want_lse = _attention(q[span], *cache.sequence(b), bool(causal))
        np.testing.assert_allclose(output[span], want_out, atol=2e-6)
        np.testing.assert_allclose(lse[span], want_lse, atol=1e-5)


# Sequences of one run (up to RUN_PAGES pages), two (100 keys) and four (300), merged after;
# partial pages; an empty sequence; 8 and 16 vector lanes.
@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("lengths", [[1, 16, 17, 0, 100], [300], [33], [0]])
def test_paged_decode_kernel_matches_numpy(lengths: list[int], lanes: int) -> None:
    rng = np.random.default_rng(2)
    cache = PagedCache(lengths, rng)
    batch = len(cache.lengths)
    q = rng.standard_normal((batch, H_Q, D), np.float32)
    zeros = [np.zeros(batch, np.int32)] * 2
    kernel = attention_decode_paged(H_KV, H_Q, D, "float32", lanes)
    output, lse = _run(kernel, [q, *cache.arrays(), *zeros], [0, 1.0, 1e4, D**-0.5], batch)
    for b in range(batch):
        want_out, want_lse = _attention(q[b : b + 1], *cache.sequence(b), causal=False)
        np.testing.assert_allclose(output[b], want_out[0], atol=2e-6)
        np.testing.assert_allclose(lse[b], want_lse[0], atol=1e-5)


def test_kernels_refuse_rope_inside_attention() -> None:
    cache = PagedCache([4], np.random.default_rng(3))
    q = np.zeros((1, H_Q, D), np.float32)
    zeros = [np.zeros(1, np.int32)] * 2
    kernel = attention_decode_paged(H_KV, H_Q, D, "float32", 8)
    with pytest.raises(Exception, match="RoPE applied"):
        _run(kernel, [q, *cache.arrays(), *zeros], [1, 1.0, 1e4, D**-0.5], 1)


def test_append_kernel_writes_what_tvms_does() -> None:
    # Tokens land in shuffled slots of several pages; position -1 means "do not store".
    from tvm.relax.frontend.nn.llm._page_kernels import _kv_cache_transpose_append

    rng = np.random.default_rng(4)
    pages = rng.standard_normal((5, 2, H_KV, PAGE_SIZE, D), np.float32)
    k, v = (rng.standard_normal((23, H_KV, D), np.float32) for _ in range(2))
    positions = rng.permutation(5 * PAGE_SIZE)[:23].astype(np.int32)
    positions[[3, 17]] = -1
    written = []
    for kernel in (kv_append(H_KV, D, "float32"), _kv_cache_transpose_append(H_KV, D, "float32")):
        out = tvm.runtime.tensor(pages)
        tvm.compile(kernel, TARGET)(out, *(tvm.runtime.tensor(a) for a in (k, v, positions)))
        written.append(out.numpy())
    ours, theirs = written
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, pages)  # it did write
