"""The Triton kernels of masked cross-attention (lmmrt/kernels/masked_cross_attention.py holds the
math, reference, launch configurations, launcher and the public op; the masking rules are described
there and in flamingo.md §4.1).

- _xattn_prefill_kernel (T > 1): one program per (row block, batch, kv head), a row being a
  (token, query head of that kv head) pair; the block's key range is the union of its rows'
  media, computed in the kernel from text_time, masked per row.
- _xattn_decode_kernel (T == 1): one program per (batch, head, key split) (flash-decoding); the
  split partials are merged by triton_common.split_softmax_combine_kernel;
- _xattn_decode_gqa_kernel (T == 1, grouped K/V): the same per (batch, kv head, key split), the
  query heads of that kv head as the program's rows.
Accumulation is fp32; the output is q's dtype.
"""

from __future__ import annotations

from lmmrt.kernels.triton_common import jit as _jit
from lmmrt.kernels.triton_common import tl

# The kernels' MODE (constexpr) of each of the op's modes; the kernels test the numbers.
MODE_IDS = {"immediate": 0, "cumulative": 1, "range": 2}


@_jit
def _xattn_row_ranges(tt, ttf, valid_row, cnt, MODE: tl.constexpr):
    """Per-row media ordinal range [lo, hi] (1-based, inclusive; empty when hi < lo) and whether
    the row is an OpenFlamingo cumulative no-media row (uniform average: all scores 0).
    ttf (text_time_first) is read in range mode only."""
    if MODE == 1:  # cumulative
        uniform = valid_row & (tt == 0)
        hi = tl.where(uniform, cnt, tl.minimum(tt, cnt))
        hi = tl.where(valid_row & (tt >= 0), hi, 0)
        lo = tl.where(hi >= 1, 1, cnt + 1)
    elif MODE == 2:  # range
        uniform = valid_row & (tt < 0)  # never true
        lo = tl.maximum(ttf, 1)
        hi = tl.minimum(tt, cnt)
        ok = valid_row & (tt >= 1) & (lo <= hi)
        lo = tl.where(ok, lo, cnt + 1)
        hi = tl.where(ok, hi, 0)
    else:
        uniform = valid_row & (tt < 0)  # never true; keeps the modes' return types alike
        ok = valid_row & (tt >= 1) & (tt <= cnt)
        lo = tl.where(ok, tt, cnt + 1)
        hi = tl.where(ok, tt, 0)
    return lo, hi, uniform


@_jit
def _attend_keys(q, k_ptrs, v_ptrs, kv_mask, allowed, uniform, m_i, l_i, acc, qk_scale, MODE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One online-softmax step over one tile of keys for a block of query rows (prefill: tokens;
    grouped decode: the query heads of one kv head). allowed: (rows or 1, keys) mask; uniform rows
    score 0 (cumulative mode). Returns (m_i, l_i, acc)."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
    if MODE == 1:
        s = tl.where(uniform[:, None], 0.0, s)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@_jit
def _xattn_prefill_kernel(
    Q, K, V, TT, TTF, MS, MC, ML, O,
    sq_b, sq_t, sq_h, sq_d,
    sk_n, sk_l, sk_h, sk_d,
    sv_n, sv_l, sv_h, sv_d,
    stt_b, stt_t, sttf_b, sttf_t, sms_b, smc_b, sml_n,
    so_b, so_t, so_h, so_d,
    T, KVH, L, qk_scale,
    MODE: tl.constexpr, HAS_MEDIA_LEN: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NEG_INIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid: (row blocks, batch * kv heads). A row is a (token, query head of the kv head) pair,
    # token-major: the GROUP query heads sharing one kv head (GQA) share every K/V tile the block
    # loads. The key range is derived here from text_time: the block loops over the union
    # [min lo, max hi] of its rows' media, masking per row. Rows of one block may see different
    # media (immediate), prefixes (cumulative) or runs (range). Keys past a media item's media_len
    # are neither loaded nor seen.
    pid_t = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // KVH
    kvh = pid_bk % KVH
    offs_r = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = offs_r // GROUP  # the token of each row
    h = kvh * GROUP + offs_r % GROUP  # the query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_mask = offs_d < HEAD_DIM

    tt = tl.load(TT + b * stt_b + offs_m * stt_t, mask=row_ok, other=0).to(tl.int32)
    ttf = tt
    if MODE == 2:
        ttf = tl.load(TTF + b * sttf_b + offs_m * sttf_t, mask=row_ok, other=0).to(tl.int32)
    start = tl.load(MS + b * sms_b).to(tl.int64)
    cnt = tl.load(MC + b * smc_b).to(tl.int32)
    lo, hi, uniform = _xattn_row_ranges(tt, ttf, row_ok, cnt, MODE)
    g_start = (tl.min(lo, 0) - 1) * L
    g_end = tl.max(hi, 0) * L  # <= g_start when no row of the block sees any media

    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sq_b + h[:, None] * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_MEDIA_LEN:
        # Mllama: long media items (every tile of an image), often mostly padding tiles: loop over
        # the block's media, each only up to its own length. A per-key length in the load masks
        # (the flat loop below) would stop the K/V loads from being pipelined (twice the
        # registers: spills).
        for m in range(tl.min(lo, 0) - 1, tl.max(hi, 0)):  # 0-based ordinals
            row = start + m
            n_keys = tl.maximum(tl.minimum(tl.load(ML + row * sml_n), L), 0)
            sees = (m + 1 >= lo) & (m + 1 <= hi)
            for l0 in tl.range(0, n_keys, BLOCK_N):
                lat = l0 + offs_n
                key_ok = lat < n_keys
                m_i, l_i, acc = _attend_keys(
                    q, K + row * sk_n + lat[:, None] * sk_l + kvh * sk_h + offs_d[None, :] * sk_d,
                    V + row * sv_n + lat[:, None] * sv_l + kvh * sv_h + offs_d[None, :] * sv_d,
                    key_ok[:, None] & d_mask[None, :], sees[:, None] & key_ok[None, :], uniform,
                    m_i, l_i, acc, qk_scale, MODE, DOT_PRECISION)
    else:
        # the keys of the sequence's media as one flat index g = (ordinal - 1) * L + l
        for g0 in tl.range(g_start, g_end, BLOCK_N):
            g = g0 + offs_n
            key_ok = g < g_end
            media = g // L  # 0-based ordinal within the sequence
            lat = g - media * L
            row = start + media  # packed media index (int64)
            ordinal = media + 1
            m_i, l_i, acc = _attend_keys(
                q, K + row[:, None] * sk_n + lat[:, None] * sk_l + kvh * sk_h + offs_d[None, :] * sk_d,
                V + row[:, None] * sv_n + lat[:, None] * sv_l + kvh * sv_h + offs_d[None, :] * sv_d,
                key_ok[:, None] & d_mask[None, :],
                key_ok[None, :] & (ordinal[None, :] >= lo[:, None]) & (ordinal[None, :] <= hi[:, None]), uniform,
                m_i, l_i, acc, qk_scale, MODE, DOT_PRECISION)

    # rows that saw no key (immediate: no media; padding) have l_i == 0: zero output
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(O + b64 * so_b + h[:, None] * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


@_jit
def _decode_split_range(TT, TTF, MS, MC, b, stt_b, sttf_b, sms_b, smc_b, split, L, MODE: tl.constexpr,
                        BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The decode token of sequence b: (its first packed media item, the ordinals [lo, hi] it
    sees, the flat key range [s_lo, s_hi) of split `split`, uniform (1,)). Flat key
    g = (ordinal - 1) * L + l; split s handles the s-th BLOCK_N-aligned chunk of the key range."""
    one = tl.arange(0, 1)
    tt = tl.load(TT + b * stt_b + one).to(tl.int32)  # (1,) keeps every per-row value a tensor
    ttf = tt
    if MODE == 2:
        ttf = tl.load(TTF + b * sttf_b + one).to(tl.int32)
    start = tl.load(MS + b * sms_b).to(tl.int64)
    cnt = tl.load(MC + b * smc_b).to(tl.int32)
    lo, hi, uniform = _xattn_row_ranges(tt, ttf, one == 0, cnt, MODE)
    lo = tl.max(lo, 0)
    hi = tl.max(hi, 0)
    g_lo = (lo - 1) * L
    g_hi = tl.maximum(hi * L, g_lo)
    chunk = tl.cdiv(tl.cdiv(g_hi - g_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    s_lo = tl.minimum(g_lo + split * chunk, g_hi)
    s_hi = tl.minimum(s_lo + chunk, g_hi)
    return start, lo, hi, s_lo, s_hi, uniform


@_jit
def _xattn_decode_kernel(
    Q, K, V, TT, TTF, MS, MC, ML, O, WS_ACC, WS_M, WS_L,
    sq_b, sq_h, sq_d,
    sk_n, sk_l, sk_h, sk_d,
    sv_n, sv_l, sv_h, sv_d,
    stt_b, sttf_b, sms_b, smc_b, sml_n,
    so_b, so_h, so_d,
    H, L, qk_scale,
    MODE: tl.constexpr, HAS_MEDIA_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, NEG_INIT: tl.constexpr,
):
    # grid: (batch * heads, splits), one kv head per query head. One query row: a tl.dot would
    # need >= 16 rows, so scores are an elementwise product + row sum (decode is bound by reading
    # K/V anyway). With NUM_SPLITS == 1 the program writes the output, otherwise its (max, sum,
    # acc) partial goes to the workspace for triton_common.split_softmax_combine_kernel.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    one = tl.arange(0, 1)
    start, _, _, s_lo, s_hi, uniform = _decode_split_range(TT, TTF, MS, MC, b, stt_b, sttf_b, sms_b, smc_b, split, L,
                                                     MODE, BLOCK_N, NUM_SPLITS)

    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sq_b + h * sq_h + offs_d * sq_d, mask=d_mask, other=0.0).to(tl.float32)
    m_i = tl.full([1], NEG_INIT, tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for g0 in tl.range(s_lo, s_hi, BLOCK_N):
        g = g0 + offs_n
        key_ok = g < s_hi
        media = g // L
        lat = g - media * L
        row = start + media
        if HAS_MEDIA_LEN:
            key_ok = key_ok & (lat < tl.load(ML + row * sml_n, mask=key_ok, other=0))
        kv_mask = key_ok[:, None] & d_mask[None, :]
        k = tl.load(K + row[:, None] * sk_n + lat[:, None] * sk_l + h * sk_h + offs_d[None, :] * sk_d,
                    mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * qk_scale
        if MODE == 1:
            s = tl.where(uniform, 0.0, s)
        s = tl.where(key_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(V + row[:, None] * sv_n + lat[:, None] * sv_l + h * sv_h + offs_d[None, :] * sv_d,
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)
        tl.store(O + b64 * so_b + h * so_h + offs_d * so_d, out.to(O.dtype.element_ty), mask=d_mask)
    else:
        ws = pid_bh.to(tl.int64) * NUM_SPLITS + split
        tl.store(WS_M + ws + one, m_i)
        tl.store(WS_L + ws + one, l_i)
        tl.store(WS_ACC + ws * BLOCK_D + offs_d, acc)


@_jit
def _xattn_decode_gqa_kernel(
    Q, K, V, TT, TTF, MS, MC, ML, O, WS_ACC, WS_M, WS_L,
    sq_b, sq_h, sq_d,
    sk_n, sk_l, sk_h, sk_d,
    sv_n, sv_l, sv_h, sv_d,
    stt_b, sttf_b, sms_b, smc_b, sml_n,
    so_b, so_h, so_d,
    H, KVH, L, GROUP, qk_scale,
    MODE: tl.constexpr, HAS_MEDIA_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, NUM_SPLITS: tl.constexpr, NEG_INIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid: (batch * kv heads, splits). The GROUP query heads sharing one kv head are the
    # program's rows, so each K/V element is read once per (sequence, split), not once per query
    # head. Scores and the weighted sum are tl.dot over BLOCK_G >= 16 rows (what tensor cores
    # need), the rows past GROUP masked. Partials as _xattn_decode_kernel's, one slot per query head.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KVH
    kvh = pid % KVH
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    h = kvh * GROUP + offs_g  # the query head of each row
    start, lo, hi, s_lo, s_hi, uniform = _decode_split_range(TT, TTF, MS, MC, b, stt_b, sttf_b, sms_b, smc_b, split, L,
                                                     MODE, BLOCK_N, NUM_SPLITS)

    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sq_b + h[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=g_ok[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if HAS_MEDIA_LEN:
        # As the prefill: each media item only up to its own length (loads stay pipelined, padding
        # tiles cost nothing); split s takes the s-th BLOCK_N-aligned chunk of every item.
        for m in range(lo - 1, hi):
            row = start + m
            n_keys = tl.maximum(tl.minimum(tl.load(ML + row * sml_n), L), 0)
            chunk = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
            k_lo = tl.minimum(split * chunk, n_keys)
            k_hi = tl.minimum(k_lo + chunk, n_keys)
            for l0 in tl.range(k_lo, k_hi, BLOCK_N):
                lat = l0 + offs_n
                key_ok = lat < k_hi
                m_i, l_i, acc = _attend_keys(
                    q, K + row * sk_n + lat[:, None] * sk_l + kvh * sk_h + offs_d[None, :] * sk_d,
                    V + row * sv_n + lat[:, None] * sv_l + kvh * sv_h + offs_d[None, :] * sv_d,
                    key_ok[:, None] & d_mask[None, :], key_ok[None, :], uniform, m_i, l_i, acc, qk_scale,
                    MODE, DOT_PRECISION)
    else:
        for g0 in tl.range(s_lo, s_hi, BLOCK_N):
            g = g0 + offs_n
            key_ok = g < s_hi
            media = g // L
            lat = g - media * L
            row = start + media
            m_i, l_i, acc = _attend_keys(
                q, K + row[:, None] * sk_n + lat[:, None] * sk_l + kvh * sk_h + offs_d[None, :] * sk_d,
                V + row[:, None] * sv_n + lat[:, None] * sv_l + kvh * sv_h + offs_d[None, :] * sv_d,
                key_ok[:, None] & d_mask[None, :], key_ok[None, :], uniform, m_i, l_i, acc, qk_scale,
                MODE, DOT_PRECISION)

    if NUM_SPLITS == 1:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(O + b64 * so_b + h[:, None] * so_h + offs_d[None, :] * so_d, out.to(O.dtype.element_ty),
                 mask=g_ok[:, None] & d_mask[None, :])
    else:
        ws = (b64 * H + h) * NUM_SPLITS + split
        tl.store(WS_M + ws, m_i, mask=g_ok)
        tl.store(WS_L + ws, l_i, mask=g_ok)
        tl.store(WS_ACC + ws[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])
