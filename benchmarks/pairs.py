"""Timing two variants as the median of interleaved pairs (native, bpext, bpext, native, ...: one
ratio per pair), which holds on a shared machine where an absolute time moves by 30%: bpext's
bench's own measurement (bpext/bench.py), for the scripts here."""

from bpext.bench import interleaved  # noqa: F401
