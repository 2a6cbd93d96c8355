"""The storage core: bit-packed masks in chunked, compressed zarr v3 bundles, their digests and
the stores that keep their bytes. Needs numpy, never torch (``tests/test_architecture.py``).

Reading order: :mod:`.bits` (packing), :mod:`.hashing` (digests), :mod:`.stores` (where bytes
live), :mod:`.chunks` and :mod:`.codecs` (arrays chunk by chunk), :mod:`.format` and
:mod:`.writer` (a bundle, read and written), :mod:`.opener` (anything that reads as a bundle).
"""
