"""CPU attention kernels for TVM's paged KV cache, in place of TVM's reference ones.

TVM's llvm kernels (`_attention_prefill_ragged_cpu`, `_attention_prefill_cpu`,
`_attention_decode_cpu`) run on one thread, one scalar at a time, re-derive every operand
inside the key loop and call libm's exp2f for every score. The kernels here take the same
parameters and write the same outputs, and are faster because:
- tasks run in parallel, each with its own scratch, and read each key and value row once for
  many queries: in a decode, the query heads that share a kv head (decode at long context is
  bound by reading the cache); in a prefill, ROWS (32) pairs of a query token and such a head,
  side by side in SIMD lanes, so that each key or value element meets all of them in one
  multiply-add with a broadcast (prefill attention 1.5-2.5x the decode's way of one task per
  token, at 512 tokens and against 1,500 cached);
- the query rows are loaded and scaled once per task, not once per key;
- keys stream by in tiles of one page (16): the tile's scores first, then a single
  online-softmax rescale per tile rather than per key, with a vectorized exp2;
- in a decode, dot products and the weighted sums of values run in SIMD lanes along head_dim,
  the lanes of 8 keys' dot products are summed together by shuffles (4 with AVX2), and the
  weighted sum of a tile's values is unrolled with the running outputs in registers (decode
  attention 1.2-1.7x the kernel before, at 1 to 16 sequences of 32 to 1,000 keys; 1.0-1.6x
  with AVX2).

For query token t of sequence b and query head h (reading kv head h // (h_q / h_kv)):
- `attention_prefill_ragged`: over the keys/values b appends in this pass (`k`, `v`, ragged);
- `attention_prefill_paged`: over the keys/values of b already in the paged cache;
- `attention_decode_paged`: one query per sequence, over its keys/values in the paged cache.
Each writes output[t, h] = softmax(q.k * sm_scale) @ v and lse[t, h], the log-sum-exp of the
scores in base 2 (scores scaled by log2(e)), with which the runtime merges partial attentions.
With causal set, query row r of a sequence with n queries and m keys sees keys 0 .. m - n + r.
A query that sees no key gets output 0 and lse -5e4, as from TVM's kernels.

RoPE is applied before the cache (`RopeMode.NORMAL`): the kernels refuse `rotary_mode != 0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import tvm
from tvm import tirx
from tvm.script import tirx as T

# TVM builds its CPU paged kernels for pages of 16 tokens; a tile of keys is one page.
PAGE_SIZE = 16
LOG2E = math.log2(math.e)
# TVM's initial running maximum: below any real score, yet exp2 of it stays finite.
NO_SCORE = -5e4


# 2**f = sum (f ln 2)**n / n! on [-1/2, 1/2]: the terms past n = 7 are below 6e-9 relative.
_EXP2_TERMS = [math.log(2) ** n / math.factorial(n) for n in range(8)]


def _exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2**x for x <= 0 in plain arithmetic, so that LLVM vectorizes it (it calls libm's exp2f
    once per element otherwise): 2**round(x) from exponent bits, times the series for the rest.
    Below 2**-126 (no normal float) it is 0."""
    clamped = T.max(x, T.float32(-126))
    whole = T.floor(clamped + T.float32(0.5))
    part = clamped - whole
    series = T.float32(_EXP2_TERMS[-1])
    for term in reversed(_EXP2_TERMS[:-1]):
        series = series * part + T.float32(term)
    power = T.reinterpret("float32", T.shift_left(T.cast(whole, "int32") + 127, 23))
    return T.Select(x < T.float32(-126), T.float32(0), series * power)


def _pairwise_sum(terms: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The sum of a power-of-two number of terms as a balanced tree: a chain of log2(n)
    additions rather than n."""
    while len(terms) > 1:
        half = len(terms) // 2
        terms = [a + b for a, b in zip(terms[:half], terms[half:], strict=True)]
    return terms[0]


def _row_sums(rows: list[tirx.PrimExpr], lanes: int) -> tirx.PrimExpr:
    """Vectors of `lanes` lanes (a power of two of them, at most `lanes`) -> the vector of
    their sums, lane i the sum of rows[i]'s lanes, by shuffles and adds: vectors are added in
    pairs, each row folded to half its lanes with the pair's rows side by side, until one
    vector holds every row; then each row is folded in place down to one lane."""
    vectors, per_vector, width = rows, 1, lanes  # rows in each vector, lanes of each row

    def halves(count: int, width: int) -> tuple[list[int], list[int]]:
        low = [row * width + i for row in range(count) for i in range(width // 2)]
        return low, [i + width // 2 for i in low]

    while len(vectors) > 1:
        low, high = halves(per_vector, width)
        vectors = [
            T.Shuffle([a, b], low + [lanes + i for i in low])
            + T.Shuffle([a, b], high + [lanes + i for i in high])
            for a, b in zip(vectors[::2], vectors[1::2], strict=True)
        ]
        per_vector, width = 2 * per_vector, width // 2
    (vector,) = vectors
    while width > 1:
        low, high = halves(per_vector, width)
        vector = T.Shuffle([vector], low) + T.Shuffle([vector], high)
        width //= 2
    return vector


def _across_lanes(
    combine: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr],
    vector: tirx.PrimExpr,
    lanes: int,
) -> tirx.PrimExpr:
    """The vector's lanes combined into one value, halving it by shuffles."""
    while lanes > 1:
        lanes //= 2
        vector = combine(
            T.Shuffle([vector], list(range(lanes))),
            T.Shuffle([vector], list(range(lanes, 2 * lanes))),
        )
    return vector


def _folded(i: tirx.PrimExpr, n: tirx.PrimExpr) -> tirx.PrimExpr:
    """Task order 0, n-1, 1, n-2, ...: under causal masking a query's cost grows with its
    position, and the thread pool hands each thread a contiguous run of tasks."""
    return T.if_then_else(i % 2 == 0, i // 2, n - 1 - i // 2)


def _visible_keys(
    causal: tirx.PrimExpr, row: tirx.PrimExpr, qo_len: tirx.PrimExpr, kv_len: tirx.PrimExpr
) -> tirx.PrimExpr:
    """How many of a sequence's first keys query `row` sees (the causal mask of TVM's kernels)."""
    return T.if_then_else(causal > 0, T.max(T.min(kv_len - qo_len + row + 1, kv_len), 0), kv_len)


def _paged_kv_len(
    page_indptr: T.Buffer, last_page_len: T.Buffer, b: tirx.PrimExpr
) -> tirx.PrimExpr:
    """How many keys sequence b holds in the paged cache."""
    pages = page_indptr[b + 1] - page_indptr[b]
    return T.if_then_else(pages > 0, (pages - 1) * PAGE_SIZE + last_page_len[b], 0)


def _tile(
    source: T.Buffer, offset: tirx.PrimExpr, row_stride: int, width: int, dtype: str
) -> T.Buffer:
    """A [PAGE_SIZE, width] view of `source`'s data: a tile of key or value rows."""
    return T.decl_buffer(
        (PAGE_SIZE, width), dtype, data=source.data, strides=(row_stride, 1), elem_offset=offset
    )


CACHE_LINE = 64  # bytes


def _prefetch_tile(d: int, dtype: str) -> Callable[..., None]:
    """A macro asking for one kv head's keys and values of a page, line by line, ahead of
    their use: a decode task reads its pages from memory once, one after the other (a run of
    4 pages or more), and the hardware had not fetched the next page ahead (decode x4 after 500
    tokens 1.07x, x1 after 2,000 1.09x)."""
    per_line = CACHE_LINE // (tvm.DataType(dtype).bits // 8)
    prefetch = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.prefetch")

    @T.macro
    def fetch_tile(pages: T.Buffer, page: T.int32, kv_head: T.int32) -> None:
        for kind in T.unroll(2):  # keys, values
            for i in T.unroll(PAGE_SIZE * d // per_line):
                T.evaluate(
                    T.call_llvm_intrin(
                        "void",
                        prefetch,
                        T.address_of(
                            pages[page, kind, kv_head, i * per_line // d, i * per_line % d]
                        ),
                        T.int32(0),  # a read
                        T.int32(3),  # kept in every cache level
                        T.int32(1),  # of data
                    )
                )

    return fetch_tile


# A decode task's dot products go a few keys at a time: each key's products with a query head,
# a register's worth of lanes at a time along head_dim, summed into one register, then those
# registers' lanes summed together by a tree of shuffles, one vector of scores out (summed key
# by key, the lanes took about 15 scalar additions a key). Keys at a time: 8 with AVX-512's 16
# lanes (3 heads' sums, 24 registers of its 32); with AVX2 (or SSE), 4 (at 8 keys its 16
# registers spilled, 0.92-0.95x).
KEYS_SUMMED, FEW_KEYS_SUMMED = 8, 4
# Slots of a task's `stats` scratch, per head.
MAX, NEW_MAX, TOTAL, RESCALE = 0, 1, 2, 3
# Registers a decode task's running outputs may take (of AVX2's 16, AVX-512's 32).
VALUE_REGISTERS = 12
# TVM keeps a constant-size local buffer under this many bytes on the stack, where LLVM can keep
# it in registers; a larger one is allocated on the heap.
STACK_BYTES = 1024


def _heads_per_task(group: int, width: int) -> int:
    """How many of the query heads that share a kv head one task takes: as many as keep its
    [heads, width] scratch on the stack. Each key and value row is then read once for them all."""
    fits = [n for n in range(1, group + 1) if group % n == 0 and n * width * 4 < STACK_BYTES]
    return max(fits, default=1)


def _scratch(heads: int, d_qk: int, d_v: int) -> tuple[T.Buffer, ...]:
    """One task's scratch, allocated inside the parallel loop so that each task has its own:
    per head, its scaled query, running output, a tile of scores, `stats`."""
    return (
        T.sblock_alloc_buffer((heads, d_qk), "float32"),
        T.sblock_alloc_buffer((heads, d_v), "float32"),
        T.sblock_alloc_buffer((heads, PAGE_SIZE), "float32"),
        T.sblock_alloc_buffer((heads, 4), "float32"),
    )


def _steps(heads: int, d_qk: int, d_v: int, vector_lanes: int) -> SimpleNamespace:
    """The steps of one decode task: a query token, `heads` query heads of one kv head."""

    @T.macro
    def start(
        query: T.Buffer,
        out: T.Buffer,
        stats: T.Buffer,
        q: T.Buffer,
        token: T.int32,
        head: T.int32,
        sm_scale: T.float32,
    ) -> None:
        for g in T.serial(heads):
            for i in T.vectorized(d_qk):
                query[g, i] = T.cast(q[token, head + g, i], "float32") * (sm_scale * LOG2E)
            for i in T.vectorized(d_v):
                out[g, i] = 0.0
            # One phantom key of score NO_SCORE: it vanishes once a real key is seen.
            stats[g, MAX] = NO_SCORE
            stats[g, TOTAL] = 1.0

    lanes = math.gcd(d_qk, vector_lanes)
    keys_summed = KEYS_SUMMED if lanes >= 16 else FEW_KEYS_SUMMED
    assert lanes >= keys_summed, f"head_dim {d_qk} is not a multiple of {keys_summed}"

    def dot(query: T.Buffer, g: tirx.PrimExpr, keys: T.Buffer, key: tirx.PrimExpr) -> tirx.PrimExpr:
        """Head g's products with a key, summed into one register along head_dim."""
        return _pairwise_sum(
            [
                query[g, T.ramp(c, 1, lanes)]
                * T.Cast(f"float32x{lanes}", keys[key, T.ramp(c, 1, lanes)])
                for c in range(0, d_qk, lanes)
            ]
        )

    @T.macro
    def score_tile(query: T.Buffer, scores: T.Buffer, keys: T.Buffer, count: T.int32) -> None:
        """scores[g, j] = query[g] . keys[j] for the tile's keys, `keys_summed` at a time, the
        heads side by side (each key is read and converted once for them all). Keys past
        `count` repeat key count - 1: their scores are masked in fold_tile."""
        for block in T.serial(PAGE_SIZE // keys_summed):
            for g in T.unroll(heads):
                scores[g, T.ramp(block * keys_summed, 1, keys_summed)] = _row_sums(
                    [
                        dot(query, g, keys, T.min(block * keys_summed + j, count - 1))
                        for j in range(keys_summed)
                    ],
                    lanes,
                )

    # The weighted sum of values goes over head_dim in chunks that keep every head's running
    # output in registers (at most VALUE_REGISTERS), key by key with the heads side by side:
    # each value row is converted once for them all, and the heads' multiply-adds are
    # independent chains.
    chunk = min(d_v, VALUE_REGISTERS // heads * vector_lanes)
    assert d_v % chunk == 0, f"head_dim {d_v} is not a multiple of {chunk}"

    @T.macro
    def fold_tile(
        out: T.Buffer, scores: T.Buffer, stats: T.Buffer, values: T.Buffer, count: T.int32
    ) -> None:
        """Online softmax: rescale each head's running output to the tile's new maximum, then
        add the tile's values weighted by exp2(score - maximum)."""
        for g in T.unroll(heads):
            seen = T.ramp(0, 1, PAGE_SIZE) < T.Broadcast(count, PAGE_SIZE)
            stats[g, NEW_MAX] = T.max(
                stats[g, MAX],
                _across_lanes(
                    T.max,
                    T.Select(
                        seen,
                        scores[g, T.ramp(0, 1, PAGE_SIZE)],
                        T.Broadcast(T.float32(MASKED), PAGE_SIZE),
                    ),
                    PAGE_SIZE,
                ),
            )
            stats[g, RESCALE] = _exp2(stats[g, MAX] - stats[g, NEW_MAX])
            for i in T.vectorized(d_v):
                out[g, i] *= stats[g, RESCALE]
            for j in T.vectorized(PAGE_SIZE):
                # Written out, not bound to a name: TVM 0.27 miscompiles a `let` inside a
                # vectorized loop (here and in score_tile the results came out wrong).
                scores[g, j] = T.Select(
                    j < count, _exp2(scores[g, j] - stats[g, NEW_MAX]), T.float32(0)
                )
            stats[g, TOTAL] = stats[g, TOTAL] * stats[g, RESCALE] + _across_lanes(
                T.Add, scores[g, T.ramp(0, 1, PAGE_SIZE)], PAGE_SIZE
            )
            stats[g, MAX] = stats[g, NEW_MAX]
        # Unrolled over the whole tile, so that LLVM keeps the running outputs in registers
        # (in a loop over the keys, it loaded and stored them at every key). Keys past `count`
        # weigh 0 and repeat the value row count - 1 (past it, a page holds no value yet).
        for c in T.serial(d_v // chunk):
            for j in T.unroll(PAGE_SIZE):
                for g in T.unroll(heads):
                    for i in T.vectorized(chunk):
                        out[g, c * chunk + i] += scores[g, j] * T.cast(
                            values[T.min(j, count - 1), c * chunk + i], "float32"
                        )

    @T.macro
    def finish(
        out: T.Buffer,
        stats: T.Buffer,
        output: T.Buffer,
        lse: T.Buffer,
        token: T.int32,
        head: T.int32,
    ) -> None:
        for g in T.serial(heads):
            for i in T.vectorized(d_v):
                output[token, head + g, i] = T.cast(out[g, i] / stats[g, TOTAL], output.dtype)
            lse[token, head + g] = stats[g, MAX] + T.log2(stats[g, TOTAL])

    return SimpleNamespace(start=start, score_tile=score_tile, fold_tile=fold_tile, finish=finish)


# A prefill task takes ROWS query rows of one sequence that share a kv head, each a (query
# token, query head) pair, side by side in SIMD lanes: every key and value element is then read
# once for all of them, as a broadcast, and the softmax runs lane-wise. (A task per query token
# read each key and value row once per token: 512-token prefill attention ran at about 0.7
# multiply-adds a cycle a core, a third of the whole step.) 32 rows ran 1.2-1.3x as fast as 16
# (fewer loads per multiply-add), and 64 no faster.
ROWS = 32
# Independent chains of multiply-adds that keep a core's FMA units busy (two units, each taking
# a new one while four are under way; 4 chains had left half the FMA slots idle). The score loop
# takes as many keys at once as that makes registers of accumulators (ROWS lanes each), the
# value loop as many elements of head_dim: 4 with AVX-512 (two registers each), 2 with AVX2.
CHAINS = 8
# The score of a key a row does not see: below NO_SCORE by more than exp2's range, so that it
# weighs nothing even beside the phantom key of a row that sees none.
MASKED = -1e30


def _row_tasks(
    h_kv: int,
    h_q: int,
    d_qk: int,
    d_v: int,
    vector_lanes: int,
    keys_held: Callable[..., tirx.PrimExpr],
    kv_tile: Callable[..., tuple[T.Buffer, T.Buffer]],
) -> Callable[..., None]:
    """The body of both prefill kernels. A sequence's query rows for a kv head (its tokens in
    order, each with the group's query heads) go in runs of ROWS; a task finds its sequence
    and run and attends to the keys the run's last row sees, a tile at a time, each lane
    masking the keys its row does not see. The kernels differ only in where their keys and
    values live, which they pass as `kv`, a tuple of their buffers: `keys_held(kv, b)` is how
    many keys sequence b holds, `kv_tile(kv, b, kv_head, tile)` the [PAGE_SIZE, d] views of the
    keys and of the values of its tile number `tile` for kv head `kv_head`."""
    group = h_q // h_kv
    at_once = max(1, CHAINS * vector_lanes // ROWS)
    assert d_v % at_once == 0, f"head_dim {d_v} is not a multiple of {at_once}"

    def clamped(tile: T.Buffer, j: tirx.PrimExpr, count: tirx.PrimExpr, i: int) -> tirx.PrimExpr:
        """Element i of key or value row j of a tile, as float32; rows past `count` (past the
        keys the run sees, or the keys held) read row count - 1 instead, whose score is masked."""
        return T.cast(tile[T.min(j, count - 1), i], "float32")

    @T.macro
    def start(
        query: T.Buffer,
        out: T.Buffer,
        stats: T.Buffer,
        visible: T.Buffer,
        q: T.Buffer,
        first_token: T.int32,
        q_len: T.int32,
        kv_len: T.int32,
        first_row: T.int32,
        kv_head: T.int32,
        causal: T.int32,
        sm_scale: T.float32,
    ) -> None:
        """Each lane's query (scaled), the keys it sees, and empty sums. Lanes past the
        sequence's rows repeat its last row."""
        for r in T.serial(ROWS):
            row: T.let[T.int32] = T.min(first_row + r, q_len * group - 1)
            token: T.let[T.int32] = first_token + row // group
            visible[r] = _visible_keys(causal, row // group, q_len, kv_len)
            for i in T.serial(d_qk):
                query[i, r] = T.cast(q[token, kv_head * group + row % group, i], "float32") * (
                    sm_scale * LOG2E
                )
        for i in T.serial(d_v):
            for r in T.vectorized(ROWS):
                out[i, r] = T.float32(0)
        for r in T.vectorized(ROWS):
            # One phantom key of score NO_SCORE: it vanishes once a real key is seen.
            stats[MAX, r] = T.float32(NO_SCORE)
            stats[TOTAL, r] = T.float32(1)

    @T.macro
    def score_tile(
        query: T.Buffer,
        scores: T.Buffer,
        acc: T.Buffer,
        visible: T.Buffer,
        keys: T.Buffer,
        tile: T.int32,
        count: T.int32,
    ) -> None:
        """scores[j, r] = query[r] . keys[j], or MASKED where row r does not see key j."""
        for block in T.serial(PAGE_SIZE // at_once):
            for kk in T.unroll(at_once):
                for r in T.vectorized(ROWS):
                    acc[kk, r] = T.float32(0)
            for i in T.serial(d_qk):
                for kk in T.unroll(at_once):
                    for r in T.vectorized(ROWS):
                        acc[kk, r] = (
                            acc[kk, r] + clamped(keys, block * at_once + kk, count, i) * query[i, r]
                        )
            for kk in T.unroll(at_once):
                for r in T.vectorized(ROWS):
                    scores[block * at_once + kk, r] = T.Select(
                        tile * PAGE_SIZE + block * at_once + kk < visible[r],
                        acc[kk, r],
                        T.float32(MASKED),
                    )

    @T.macro
    def fold_tile(
        out: T.Buffer,
        scores: T.Buffer,
        stats: T.Buffer,
        acc: T.Buffer,
        values: T.Buffer,
        count: T.int32,
    ) -> None:
        """Online softmax, lane by lane: rescale each row's running output to the tile's new
        maximum, then add the tile's values weighted by exp2(score - maximum)."""
        for r in T.vectorized(ROWS):
            stats[NEW_MAX, r] = stats[MAX, r]
        for j in T.serial(PAGE_SIZE):
            for r in T.vectorized(ROWS):
                stats[NEW_MAX, r] = T.max(stats[NEW_MAX, r], scores[j, r])
        for r in T.vectorized(ROWS):
            stats[RESCALE, r] = _exp2(stats[MAX, r] - stats[NEW_MAX, r])
            stats[TOTAL, r] = stats[TOTAL, r] * stats[RESCALE, r]
            stats[MAX, r] = stats[NEW_MAX, r]
        for j in T.serial(PAGE_SIZE):
            for r in T.vectorized(ROWS):
                scores[j, r] = _exp2(scores[j, r] - stats[MAX, r])
                stats[TOTAL, r] = stats[TOTAL, r] + scores[j, r]
        for block in T.serial(d_v // at_once):
            for ii in T.unroll(at_once):
                for r in T.vectorized(ROWS):
                    acc[ii, r] = out[block * at_once + ii, r] * stats[RESCALE, r]
            for j in T.serial(PAGE_SIZE):
                for ii in T.unroll(at_once):
                    for r in T.vectorized(ROWS):
                        acc[ii, r] = acc[ii, r] + scores[j, r] * clamped(
                            values, j, count, block * at_once + ii
                        )
            for ii in T.unroll(at_once):
                for r in T.vectorized(ROWS):
                    out[block * at_once + ii, r] = acc[ii, r]

    @T.macro
    def finish(
        out: T.Buffer,
        stats: T.Buffer,
        output: T.Buffer,
        lse: T.Buffer,
        first_token: T.int32,
        q_len: T.int32,
        first_row: T.int32,
        kv_head: T.int32,
    ) -> None:
        for r in T.serial(ROWS):
            if first_row + r < q_len * group:
                token: T.let[T.int32] = first_token + (first_row + r) // group
                head: T.let[T.int32] = kv_head * group + (first_row + r) % group
                for i in T.serial(d_v):
                    output[token, head, i] = T.cast(out[i, r] / stats[TOTAL, r], output.dtype)
                lse[token, head] = stats[MAX, r] + T.log2(stats[TOTAL, r])

    @T.macro
    def attend(
        q: T.Buffer,
        q_indptr: T.Buffer,
        kv: tuple[T.Buffer, ...],
        output: T.Buffer,
        lse: T.Buffer,
        n_tokens: T.int32,
        batch_size: T.int32,
        causal: T.int32,
        sm_scale: T.float32,
    ) -> None:
        # Runs per kv head: each sequence's rows in runs of ROWS, its last run perhaps partial.
        runs = T.ceildiv(n_tokens * group, ROWS) + batch_size
        for task in T.parallel(h_kv * runs):
            with T.sblock("attend"):
                T.reads()  # the rows a task touches depend on values it reads: declare none
                T.writes()
                query = T.sblock_alloc_buffer((d_qk, ROWS), "float32")
                out = T.sblock_alloc_buffer((d_v, ROWS), "float32")
                scores = T.sblock_alloc_buffer((PAGE_SIZE, ROWS), "float32")
                acc = T.sblock_alloc_buffer((at_once, ROWS), "float32")
                stats = T.sblock_alloc_buffer((4, ROWS), "float32")
                visible = T.sblock_alloc_buffer((ROWS,), "int32")
                first_run = T.sblock_alloc_buffer((1,), "int32")  # of the sequence at hand
                kv_head: T.let[T.int32] = task % h_kv
                run: T.let[T.int32] = _folded(task // h_kv, runs)
                first_run[0] = 0
                for b in T.serial(batch_size):
                    q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    run_count: T.let[T.int32] = T.ceildiv(q_len * group, ROWS)
                    if first_run[0] <= run and run < first_run[0] + run_count:
                        first_row: T.let[T.int32] = (run - first_run[0]) * ROWS
                        start(query, out, stats, visible, q, q_indptr[b], q_len,
                              keys_held(kv, b), first_row, kv_head, causal, sm_scale)  # fmt: skip
                        # Rows see more keys the later their token, and lanes past the
                        # sequence's rows repeat its last: the last lane sees most.
                        n_keys: T.let[T.int32] = visible[ROWS - 1]
                        for tile in T.serial(T.ceildiv(n_keys, PAGE_SIZE)):
                            keys, values = kv_tile(kv, b, kv_head, tile)
                            count = T.min(PAGE_SIZE, n_keys - tile * PAGE_SIZE)
                            score_tile(query, scores, acc, visible, keys, tile, count)
                            fold_tile(out, scores, stats, acc, values, count)
                        finish(out, stats, output, lse, q_indptr[b], q_len, first_row, kv_head)
                    first_run[0] = first_run[0] + run_count

    return attend


def attention_prefill_ragged(
    h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str, vector_lanes: int
) -> tirx.PrimFunc:
    """In place of TVM's `_attention_prefill_ragged_cpu`: attention among the new tokens."""

    def keys_held(kv: tuple[T.Buffer, ...], b: tirx.PrimExpr) -> tirx.PrimExpr:
        _, _, kv_indptr = kv
        return kv_indptr[b + 1] - kv_indptr[b]

    def kv_tile(
        kv: tuple[T.Buffer, ...], b: tirx.PrimExpr, kv_head: tirx.PrimExpr, tile: tirx.PrimExpr
    ) -> tuple[T.Buffer, T.Buffer]:
        k, v, kv_indptr = kv
        # The tile's first row of k and of v, taken as [kv_len * h_kv, d] arrays.
        first = (kv_indptr[b] + tile * PAGE_SIZE) * h_kv + kv_head
        return (
            _tile(k, first * d_qk, h_kv * d_qk, d_qk, dtype),
            _tile(v, first * d_v, h_kv * d_v, d_v, dtype),
        )

    attend = _row_tasks(h_kv, h_q, d_qk, d_v, vector_lanes, keys_held, kv_tile)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,  # [qo_len, h_q, d_qk]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_k: T.handle,  # [kv_len, h_kv, d_qk]
        var_v: T.handle,  # [kv_len, h_kv, d_v]
        var_kv_indptr: T.handle,  # [batch_size + 1]
        var_q_rope_position: T.handle,  # [qo_len], unused: RoPE is applied already
        var_k_rope_pos_offset: T.handle,  # [batch_size], unused
        var_output: T.handle,  # [qo_len, h_q, d_v]
        var_lse: T.handle,  # [qo_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=T.int32())
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "attention kernels expect RoPE applied (RopeMode.NORMAL)"

        attend(q, q_indptr, (k, v, kv_indptr), output, lse, qo_len, batch_size, causal, sm_scale)

    return batch_prefill_ragged_kv


def attention_prefill_paged(
    h_kv: int, h_q: int, d: int, dtype: str, vector_lanes: int
) -> tirx.PrimFunc:
    """In place of TVM's `_attention_prefill_cpu` (no sliding window): the new tokens against
    what their sequences hold in the paged cache."""
    page_stride = h_kv * PAGE_SIZE * d  # elements from a page's K half to its V half

    def keys_held(kv: tuple[T.Buffer, ...], b: tirx.PrimExpr) -> tirx.PrimExpr:
        _, page_indptr, _, last_page_len = kv
        return _paged_kv_len(page_indptr, last_page_len, b)

    def kv_tile(
        kv: tuple[T.Buffer, ...], b: tirx.PrimExpr, kv_head: tirx.PrimExpr, tile: tirx.PrimExpr
    ) -> tuple[T.Buffer, T.Buffer]:
        pages, page_indptr, page_values, _ = kv
        page = page_values[page_indptr[b] + tile]
        first = (page * 2 * h_kv + kv_head) * PAGE_SIZE * d
        return _tile(pages, first, d, d, dtype), _tile(pages, first + page_stride, d, d, dtype)

    attend = _row_tasks(h_kv, h_q, d, d, vector_lanes, keys_held, kv_tile)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch_size]: keys in each sequence's last page
        var_k_rope_pos_offset: T.handle,  # [batch_size], unused: RoPE is applied already
        var_q_rope_position: T.handle,  # [total_len], unused
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, PAGE_SIZE, d), dtype)
        page_indptr = T.match_buffer(
            var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32()
        )
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        last_page_len = T.match_buffer(
            var_length_info, (batch_size,), "int32", elem_offset=T.int32()
        )
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        assert rotary_mode == 0, "attention kernels expect RoPE applied (RopeMode.NORMAL)"

        attend(
            q,
            q_indptr,
            (pages, page_indptr, page_values, last_page_len),
            output,
            lse,
            total_len,
            batch_size,
            causal,
            sm_scale,
        )

    return batch_prefill_paged_kv_cpu


def attention_decode_paged(
    h_kv: int, h_q: int, d: int, dtype: str, vector_lanes: int
) -> tirx.PrimFunc:
    """In place of TVM's `_attention_decode_cpu` (no sliding window): each sequence's one new
    token against everything the sequence holds in the paged cache.

    A decode has few tasks (SmolLM2: 3 per sequence, one per kv head), so each sequence's pages
    are split into SPLITS runs; each task attends to one run and keeps its unnormalized output,
    maximum and total, and a serial pass then merges the runs of each head (at 1000 keys, 3
    tasks on 2 threads had left one thread a third of the time idle). The split is the same
    whatever the batch, so a sequence's sums run in the same order alone and batched: with the
    int8 matmuls, which round each row on its own, its logits are then the same bit for bit
    (an order that depended on the batch moved them by float rounding, which an int8 rounding
    step could turn into a different greedy token)."""
    group = h_q // h_kv
    heads = _heads_per_task(group, d)
    step = _steps(heads, d, d, vector_lanes)
    fetch_tile = _prefetch_tile(d, dtype)
    blocks = h_q // heads  # tasks per query token
    page_stride = h_kv * PAGE_SIZE * d

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        var_q: T.handle,  # [batch_size, h_q, d]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch_size]: keys in each sequence's last page
        var_k_rope_pos_offset: T.handle,  # [batch_size], unused: RoPE is applied already
        var_q_rope_position: T.handle,  # [batch_size], unused
        var_output: T.handle,  # [batch_size, h_q, d]
        var_lse: T.handle,  # [batch_size, h_q]
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, PAGE_SIZE, d), dtype)
        page_indptr = T.match_buffer(
            var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32()
        )
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        last_page_len = T.match_buffer(
            var_length_info, (batch_size,), "int32", elem_offset=T.int32()
        )
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")
        assert rotary_mode == 0, "attention kernels expect RoPE applied (RopeMode.NORMAL)"

        with T.sblock("root"):
            # Per sequence, query head and run: the run's output (not yet divided by its
            # total), and its maximum and total.
            run_out = T.sblock_alloc_buffer((batch_size, h_q, SPLITS, d), "float32")
            run_stats = T.sblock_alloc_buffer((batch_size, h_q, SPLITS, 2), "float32")
            for task in T.parallel(batch_size * blocks * SPLITS):
                with T.sblock("attend"):
                    T.reads()  # the rows a task touches depend on values it reads: declare none
                    T.writes()
                    query, out, scores, stats = _scratch(heads, d, d)
                    b: T.let[T.int32] = task // (blocks * SPLITS)
                    h: T.let[T.int32] = task // SPLITS % blocks * heads  # its first head
                    run: T.let[T.int32] = task % SPLITS
                    n_keys: T.let[T.int32] = _paged_kv_len(page_indptr, last_page_len, b)
                    n_pages: T.let[T.int32] = T.ceildiv(n_keys, PAGE_SIZE)
                    per_run: T.let[T.int32] = T.max(T.ceildiv(n_pages, SPLITS), RUN_PAGES)
                    # Run 0 holds the phantom key, so it runs even without keys; a later run
                    # without keys only says so (total 0), and the merge passes over it.
                    if run == 0 or run * per_run < n_pages:
                        step.start(query, out, stats, q, b, h, sm_scale)
                        last: T.let[T.int32] = T.min((run + 1) * per_run, n_pages)
                        for tile in T.serial(run * per_run, last):
                            page = page_values[page_indptr[b] + tile]
                            first = (page * 2 * h_kv + h // group) * PAGE_SIZE * d
                            if tile + 1 < last:
                                next_page = page_values[page_indptr[b] + tile + 1]
                                fetch_tile(pages, next_page, h // group)
                            keys = _tile(pages, first, d, d, dtype)
                            values = _tile(pages, first + page_stride, d, d, dtype)
                            count = T.min(PAGE_SIZE, n_keys - tile * PAGE_SIZE)
                            step.score_tile(query, scores, keys, count)
                            step.fold_tile(out, scores, stats, values, count)
                        for g in T.serial(heads):
                            for i in T.vectorized(d):
                                run_out[b, h + g, run, i] = out[g, i]
                            run_stats[b, h + g, run, 0] = stats[g, MAX]
                            run_stats[b, h + g, run, 1] = stats[g, TOTAL]
                    else:
                        for g in T.serial(heads):
                            run_stats[b, h + g, run, 0] = T.float32(NO_SCORE)
                            run_stats[b, h + g, run, 1] = T.float32(0)
            for b, head in T.grid(batch_size, h_q):
                with T.sblock("merge"):
                    T.reads()
                    T.writes()
                    _merge_runs(run_out, run_stats, output, lse, b, head, SPLITS, d)

    return batch_decode_paged_kv


# A decode splits each sequence's keys into up to this many runs, whatever the batch (enough
# tasks for a 2-to-8-core CPU at batch 1), of at least RUN_PAGES pages each: a run's fixed costs
# (its query, its partial output and the merge) outweighed a page or two of keys, and a batch of
# short sequences has tasks enough without splitting them.
SPLITS = 4
RUN_PAGES = 4


@T.macro
def _merge_runs(
    run_out: T.Buffer,
    run_stats: T.Buffer,
    output: T.Buffer,
    lse: T.Buffer,
    b: T.int32,
    head: T.int32,
    splits: T.int32,
    d: T.int32,
) -> None:
    """One head's runs combined: each weighted by 2**(its maximum - the largest maximum).
    Run 0 holds the phantom key (NO_SCORE, total 1), which weighs nothing beside a real key
    and, with no keys at all, gives TVM's empty answer (0, lse -5e4)."""
    merged = T.sblock_alloc_buffer((3,), "float32")  # largest maximum, total, weight
    sums = T.sblock_alloc_buffer((d,), "float32")
    merged[0] = run_stats[b, head, 0, 0]
    for run in T.serial(1, splits):
        merged[0] = T.max(merged[0], run_stats[b, head, run, 0])
    merged[1] = T.float32(0)
    for run in T.serial(splits):
        merged[1] += run_stats[b, head, run, 1] * _exp2(run_stats[b, head, run, 0] - merged[0])
    for i in T.vectorized(d):
        sums[i] = T.float32(0)
    for run in T.serial(splits):
        # A run without keys (total 0) adds nothing: most runs of a short sequence.
        if run_stats[b, head, run, 1] > T.float32(0):
            merged[2] = _exp2(run_stats[b, head, run, 0] - merged[0]) / merged[1]
            for i in T.vectorized(d):
                sums[i] += run_out[b, head, run, i] * merged[2]
    for i in T.vectorized(d):
        output[b, head, i] = T.cast(sums[i], output.dtype)
    lse[b, head] = merged[0] + T.log2(merged[1])
