#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes fuzz/corpus/seed-*: one small input per entry point and mask kind.

Each seed encodes a configuration the way fuzz_input.hpp's draw_config reads it
(FuzzedDataProvider takes integers from the end of the input, one byte per value for
ranges under 256) followed, at the front, by the matrices' values (one byte each).
Run from anywhere: python3 fuzz/make_corpus.py
"""
import os
import random

ENTRIES = ["sdpa", "dot", "bilinear", "cosine", "soft_cap", "top_k", "local_window", "additive", "batched", "decode",
           "multi_head", "merge", "decode_split", "rotary", "sinusoidal"]
SCALINGS = ["none", "linear", "ntk_aware", "yarn", "llama3"]
MASKS = ["none", "causal", "window", "key_padding", "boolean", "additive",
         "window_and_boolean", "causal_and_additive", "padding_and_window", "boolean_and_additive"]
LAYOUTS = ["contiguous", "nan_padded", "column_major", "unaligned"]
VALUES = ["raw", "small", "small_with_specials", "scaled"]


def encode(cfg):
    """The configuration bytes in the order draw_config consumes them."""
    out = []

    def rng(lo, hi, v):
        """ConsumeIntegralInRange: as many bytes as the range needs, most significant first."""
        assert lo <= v <= hi
        span, offset, value = hi - lo, 0, v - lo
        width = 0
        while offset < 64 and (span >> offset) > 0:
            offset += 8
            width += 1
        out.extend(value.to_bytes(width, "big"))

    rng(0, 1, cfg.get("double", 0))
    rng(0, len(ENTRIES) - 1, ENTRIES.index(cfg["entry"]))
    for key in ("lq", "lk", "dk", "dv"):
        rng(0, 64, cfg[key])
    rng(0, 16, cfg.get("d2", 4))
    rng(0, 9, MASKS.index(cfg.get("mask", "none")))
    rng(0, 1, cfg.get("bottom_right", 0))
    rng(-2, 70, cfg.get("left", 2))
    rng(-2, 70, cfg.get("right", 1))
    rng(-1, 66, cfg.get("valid", cfg["lk"] // 2))
    rng(-2, 70, cfg.get("window_left", 3))
    rng(-2, 70, cfg.get("window_right", 0))
    rng(0, 1, cfg.get("window_bottom_right", 0))
    rng(0, 255, cfg.get("density", 128))
    rng(0, 1, cfg.get("dense_column_major", 0))
    rng(0, 7, cfg.get("scale", 0))
    if cfg.get("scale", 0) == 6:
        rng(0, 255, 64)
        rng(-10, 6, -2)
    rng(0, 3, cfg.get("block_q", 2))
    if cfg.get("block_q", 2) >= 2:
        rng(1, 80, cfg.get("bq", 5))
    elif cfg.get("block_q", 2) == 1:
        rng(1, 3, 1)
    rng(0, 3, cfg.get("block_k", 2))
    if cfg.get("block_k", 2) >= 2:
        rng(1, 80, cfg.get("bk", 7))
    elif cfg.get("block_k", 2) == 1:
        rng(1, 3, 1)
    rng(0, 3, LAYOUTS.index(cfg.get("layout", "contiguous")))
    rng(0, 3, VALUES.index(cfg.get("values", "small")))
    rng(-40, 40, cfg.get("exponent", 0))
    rng(0, 15, cfg.get("perturb", 15))
    rng(0, 7, cfg.get("param", 4))
    if cfg.get("param", 4) >= 4:
        rng(0, 255, 32)
        rng(-6, 6, 0)
    rng(-1, 70, cfg.get("top_k", 3))
    rng(0, 3, cfg.get("heads", 2))
    rng(0, 3, cfg.get("batch", 2))
    if cfg["entry"] == "decode":
        chunks = cfg.get("chunks", [3, 1, 1, 2])
        rng(1, 8, len(chunks))
        for c in chunks:
            rng(0, 9, c)
    entry = cfg["entry"]
    rng(0, 3, cfg.get("threads", 1) - 1)
    rng(0, 1, cfg.get("eigen_threads", 1) - 1)
    if entry == "merge":
        chunks = cfg.get("chunks", [3, 0, 4, 2])
        rng(1, 6, len(chunks))
        for c in chunks:
            rng(0, 24, c)
    if entry in ("multi_head", "rotary"):
        rng(-1, 1, cfg.get("rope", -1))  # -1 none, 0 half-split, 1 interleaved
        rng(0, 18, cfg.get("rotary_dim", 0))
        rng(0, 4, SCALINGS.index(cfg.get("scaling", "none")))
        factor = cfg.get("factor", 16)  # 0: 0.5, 1: inf, 2: 1, else 1 + factor / 8
        rng(0, 7, min(factor, 3))
        if factor >= 3:
            rng(0, 255, factor)
        rng(-1, 64, cfg.get("original_max_position", 2048) // 64)
        rng(-1, 64, cfg.get("beta_fast", 32))
        rng(0, 8, cfg.get("beta_slow", 4))  # / 4
        rng(0, 8, cfg.get("low_freq_factor", 2))  # / 2
        rng(0, 16, cfg.get("high_freq_factor", 8))  # / 2
        rng(-1, 80, cfg.get("cache_length", 16))
        rng(0, 1, cfg.get("explicit_positions", 0))
    if entry in ("rotary", "sinusoidal"):
        kind, position = cfg.get("position", (0, 3))
        rng(0, 3, kind)
        if kind in (0, 1):
            rng(0, 100, position)
        elif kind == 2:
            rng(0, 1 << 20, position)
        else:
            rng(-(1 << 63), (1 << 63) - 1, position)
        rng(0, 5, cfg.get("base", 5))  # 0: 0.5, 1: 1, 2: NaN, 3: 500000, else 10000
    if entry == "multi_head":
        rng(0, 2, cfg.get("need_weights", 0))
        for key in ("e_k", "e_v", "e_out"):
            rng(0, 12, cfg.get(key, 5))
        rng(0, 15, cfg.get("biases", 15))
    if entry == "decode":
        rng(0, 1, cfg.get("paged", 0))
    return bytes(out)


def seed(cfg, rnd):
    values = bytes(rnd.randrange(256) for _ in range(cfg.get("value_bytes", 96)))
    return values + encode(cfg)[::-1]


def configs():
    base = dict(lq=7, lk=9, dk=5, dv=3)
    for entry in ENTRIES:
        yield dict(base, entry=entry, name=f"{entry}-plain")
    for mask in MASKS:
        for entry in ("sdpa", "top_k", "batched"):
            yield dict(base, entry=entry, mask=mask, bottom_right=MASKS.index(mask) % 2,
                       name=f"{entry}-{mask}")
    for layout in LAYOUTS[1:]:
        yield dict(base, entry="sdpa", mask="causal", layout=layout, name=f"sdpa-{layout}")
    yield dict(base, entry="sdpa", values="small_with_specials", mask="additive", name="sdpa-specials")
    yield dict(base, entry="sdpa", values="raw", value_bytes=200, name="sdpa-raw-floats")
    yield dict(base, entry="sdpa", values="scaled", exponent=6, name="sdpa-large-logits")
    yield dict(base, entry="sdpa", double=1, mask="window", name="sdpa-double-window")
    yield dict(base, entry="sdpa", lq=0, lk=0, name="sdpa-empty")
    yield dict(base, entry="sdpa", dk=0, name="sdpa-head-dim-0")
    yield dict(base, entry="sdpa", mask="window", left=-2, name="sdpa-bad-window")
    yield dict(base, entry="sdpa", mask="key_padding", valid=20, name="sdpa-bad-padding")
    yield dict(base, entry="sdpa", block_q=1, name="sdpa-bad-block")
    yield dict(base, entry="sdpa", lq=40, lk=50, dk=17, dv=9, bq=3, bk=16, mask="causal", name="sdpa-tiles")
    for p, what in enumerate(["key_dim", "value_rows", "mask_shape", "out_shape", "lse_size"], start=1):
        yield dict(base, entry="sdpa", mask="boolean", perturb=p, name=f"sdpa-bad-{what}")
    yield dict(base, entry="decode", left=4, lk=6, chunks=[2, 1, 1, 3, 1], name="decode-window")
    yield dict(base, entry="cosine", scale=0, param=0, name="cosine-bad-temperature")
    yield dict(base, entry="soft_cap", scale=6, name="soft_cap-scaled")
    # Layers, split-KV, positional encodings, threads.
    mh = dict(base, entry="multi_head", dk=8, dv=12, d2=6, heads=2, batch=2, threads=2)
    yield dict(mh, name="multi_head-gqa")
    yield dict(mh, heads=0, batch=3, eigen_threads=2, name="multi_head-mha-eigen-threads")
    yield dict(mh, heads=1, batch=3, biases=0, name="multi_head-mqa-no-bias")
    for weights, what in ((1, "per-head"), (2, "averaged")):
        yield dict(mh, need_weights=weights, mask="causal_and_additive", name=f"multi_head-weights-{what}")
    for layout in (0, 1):
        for scaling in SCALINGS:
            yield dict(mh, rope=layout, scaling=scaling, mask="causal", threads=3,
                       name=f"multi_head-rotary-{'interleaved' if layout else 'half'}-{scaling}")
    yield dict(mh, dk=24, rope=0, rotary_dim=4, scaling="yarn", name="multi_head-partial-rotary-yarn")
    yield dict(mh, lq=12, lk=12, dk=4, mask="window", rope=1, name="multi_head-window-rotary")
    yield dict(mh, d2=0, e_k=0, e_v=0, e_out=0, name="multi_head-zero-widths")
    for p, what in enumerate(["key_width", "value_rows", "mask_shape", "out_bias", "rope_head_dim"], start=1):
        yield dict(mh, rope=0, mask="boolean", perturb=p, name=f"multi_head-bad-{what}")
    yield dict(mh, dk=3, name="multi_head-bad-head-dim")
    yield dict(base, entry="merge", mask="boolean_and_additive", name="merge-dense-mask")
    yield dict(base, entry="merge", mask="causal", chunks=[0, 2, 2, 2, 1, 9], threads=2, name="merge-causal-chunks")
    yield dict(base, entry="merge", double=1, mask="window", chunks=[9], name="merge-one-chunk")
    yield dict(base, entry="merge", lq=20, lk=40, dk=8, dv=5, bq=3, bk=4, chunks=[7, 13, 1], values="scaled",
               exponent=3, name="merge-large-logits")
    for p, what in enumerate(["alias", "none", "", "taller", "longer_lse"], start=1):
        if what:
            yield dict(base, entry="merge", perturb=p, name=f"merge-bad-{what}")
    ds = dict(base, entry="decode_split", lk=9, dk=8, dv=5, heads=2, batch=2, dense_column_major=1, threads=2)
    yield dict(ds, name="decode_split-gqa-lse")
    yield dict(ds, d2=16, lk=64, block_k=0, name="decode_split-default-splits")
    yield dict(ds, lk=33, bk=1, heads=1, batch=3, name="decode_split-mqa-split-1")
    yield dict(ds, lk=0, name="decode_split-no-keys")
    yield dict(ds, dk=16, dv=16, double=1, eigen_threads=2, threads=4, bk=3, name="decode_split-double-threads")
    for p, what in enumerate(["key_width", "value_rows", "", "out_shape", "lse_size"], start=1):
        if what:
            yield dict(ds, perturb=p, name=f"decode_split-bad-{what}")
    yield dict(ds, block_k=1, name="decode_split-bad-block")
    ro = dict(base, entry="rotary", lq=6, dk=24, heads=2, batch=1, rope=0)
    for layout in (0, 1):
        for scaling in SCALINGS:
            yield dict(ro, rope=layout, scaling=scaling, rotary_dim=4 if scaling == "yarn" else 0,
                       name=f"rotary-{'interleaved' if layout else 'half'}-{scaling}")
    yield dict(ro, explicit_positions=1, position=(1, 40), name="rotary-positions")
    yield dict(ro, position=(2, 5000), cache_length=3, name="rotary-far-positions")
    yield dict(ro, position=(3, (1 << 63) - 3), name="rotary-position-near-max")
    yield dict(ro, explicit_positions=1, position=(3, -(1 << 63)), name="rotary-positions-extreme")
    yield dict(ro, factor=0, scaling="linear", name="rotary-bad-factor")
    yield dict(ro, scaling="yarn", beta_fast=0, name="rotary-bad-betas")
    yield dict(ro, scaling="llama3", low_freq_factor=4, high_freq_factor=2, name="rotary-bad-llama3")
    yield dict(ro, rotary_dim=5, name="rotary-odd-dim")
    yield dict(ro, base=1, name="rotary-bad-base")
    yield dict(ro, cache_length=-1, name="rotary-bad-cache")
    yield dict(ro, perturb=1, name="rotary-bad-width")
    yield dict(ro, perturb=2, explicit_positions=1, name="rotary-bad-positions")
    si = dict(base, entry="sinusoidal", lq=5, dk=7)
    yield dict(si, name="sinusoidal-odd-width")
    yield dict(si, position=(1, 30), base=0, name="sinusoidal-negative-offset")
    yield dict(si, position=(2, 100000), base=3, name="sinusoidal-far")
    yield dict(si, position=(3, (1 << 63) - 2), name="sinusoidal-offset-near-max")
    yield dict(si, base=2, name="sinusoidal-bad-base")
    yield dict(si, perturb=1, name="sinusoidal-bad-width")
    yield dict(si, perturb=2, name="sinusoidal-bad-length")
    # Paged decoding: a forked, truncated sequence beside its parent (run_paged).
    pg = dict(base, entry="decode", paged=1, dk=8, dv=5, heads=2, batch=2, chunks=[5, 3, 1, 4], bk=4, left=2,
              threads=2)
    yield dict(pg, name="paged-fork")
    yield dict(pg, block_k=0, chunks=[9, 9, 9, 2], name="paged-default-block")
    yield dict(pg, bk=1, left=70, name="paged-block-1-truncate-all")
    yield dict(pg, valid=-1, name="paged-pool-too-small")
    yield dict(pg, double=1, bk=3, heads=1, batch=3, threads=4, name="paged-double-mqa")
    yield dict(pg, block_k=1, name="paged-bad-block")
    yield dict(pg, chunks=[0, 2, 0, 1], name="paged-empty-chunks")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    corpus = os.path.join(here, "corpus")
    os.makedirs(corpus, exist_ok=True)
    rnd = random.Random(2024)
    for cfg in configs():
        with open(os.path.join(corpus, "seed-" + cfg["name"]), "wb") as f:
            f.write(seed(cfg, rnd))


if __name__ == "__main__":
    main()
