#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_kernels.c into tests/fuzz/corpus/: for every function (the
first byte of an input picks it, see the enum in fuzz_kernels.c) one input of all-default
choices (zero bytes read as the plain option) and two of fixed pseudo-random bytes."""
import os
import random

FUNCTIONS = 35  # F_COUNT in fuzz_kernels.c
here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus")
os.makedirs(out, exist_ok=True)
rng = random.Random(20240917)
for f in range(FUNCTIONS):
    seeds = [bytes([f]) + bytes(24)]
    for n in (48, 160):
        seeds.append(bytes([f]) + bytes(rng.randrange(256) for _ in range(n)))
    for i, data in enumerate(seeds):
        with open(os.path.join(out, "seed-%02d-%d" % (f, i)), "wb") as fh:
            fh.write(data)
