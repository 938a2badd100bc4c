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

ENTRIES = ["sdpa", "dot", "bilinear", "cosine", "soft_cap", "top_k", "local_window", "additive", "batched", "decode"]
MASKS = ["none", "causal", "window", "key_padding", "boolean", "additive",
         "window_and_boolean", "causal_and_additive", "padding_and_window", "boolean_and_additive"]
LAYOUTS = ["contiguous", "nan_padded", "column_major", "unaligned"]
VALUES = ["raw", "small", "small_with_specials", "scaled"]


def encode(cfg):
    """The configuration bytes in the order draw_config consumes them."""
    out = []

    def rng(lo, hi, v):
        assert lo <= v <= hi and hi - lo < 256
        out.append(v - lo)

    rng(0, 1, cfg.get("double", 0))
    rng(0, 9, ENTRIES.index(cfg["entry"]))
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
