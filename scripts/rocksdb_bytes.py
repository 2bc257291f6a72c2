#!/usr/bin/env python3
"""Sizes rows as RocksDB's compacted, bottommost tables would hold them, to price a row layout offline.

Input: directories written by `cargo run --example dump_rows -- <shard> <out>`. Output: bytes per tx for
each column family, emulated and as RocksDB reported them. The emulation follows the block-based table
format as `node/src/rocks.rs` configures it: entries delta-coded against the key before (restart point every
64 keys), internal keys with their 8-byte trailer (sequence numbers zeroed at the bottommost level), 32 KiB
blocks compressed one by one with zstd (level 6 for `history` and `txs`, 3 elsewhere; a block kept raw
unless it saves 1/8), a 5-byte block trailer, an index entry per block and ~7 bits of filter per filtered
key (one per address in `history`). On the generated chain it lands within 0.2% of RocksDB's own figure.

To price a layout, import `table_bytes` and feed it the rows transformed as the layout would write them.
Needs the `zstandard` package (pip install zstandard).
"""
import os
import struct
import sys

import zstandard

BLOCK = 32 << 10
RESTART = 64
TRAILER = b"\x01" + b"\x00" * 7  # a value's internal-key trailer once compacted to the bottommost level
FILTER_BITS = 7.0  # Ribbon at Bloom-10's false-positive rate
LEVEL = {"history": 6, "txs": 6}
FILTERED = {"txs", "outspends", "history"}


def read_rows(path):
    data = open(path, "rb").read()
    rows, i = [], 0
    while i < len(data):
        (klen,) = struct.unpack_from("<I", data, i)
        key = data[i + 4 : i + 4 + klen]
        i += 4 + klen
        (vlen,) = struct.unpack_from("<I", data, i)
        rows.append((key, data[i + 4 : i + 4 + vlen]))
        i += 4 + vlen
    return rows


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def table_bytes(rows, level=3, filter_keys=0):
    """Bytes of a table holding `rows` (sorted (key, value) pairs), with `filter_keys` filter entries."""
    zstd = zstandard.ZstdCompressor(level=level)
    total, block, restarts, prev = 0, bytearray(), [], b""

    def finish_block():
        nonlocal total, block, restarts
        if block:
            raw = bytes(block) + b"".join(struct.pack("<I", r) for r in restarts)
            raw += struct.pack("<I", len(restarts))
            packed = len(zstd.compress(raw)) - 6  # RocksDB stores no zstd frame header
            total += (packed if packed < len(raw) - len(raw) // 8 else len(raw)) + 5
            total += len(prev) + 4  # its index entry: a separator key and a block handle
        block, restarts = bytearray(), []

    for n, (key, value) in enumerate(rows):
        key += TRAILER
        shared = 0
        if n % RESTART == 0:
            restarts.append(len(block))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        block += varint(shared) + varint(len(key) - shared) + varint(len(value))
        block += key[shared:] + value
        prev = key
        if len(block) >= BLOCK:
            finish_block()
    finish_block()
    return total + int(filter_keys * FILTER_BITS / 8)


def main(dirs):
    txs, emulated, reported = 0, {}, {}
    for d in dirs:
        sizes = dict(line.split() for line in open(os.path.join(d, "sizes")))
        txs += len(read_rows(os.path.join(d, "txs")))
        for cf, size in sizes.items():
            rows = read_rows(os.path.join(d, cf)) if os.path.exists(os.path.join(d, cf)) else []
            if cf == "history":
                keys = sum(1 for key, _ in rows if len(key) == 12)  # the prefix filter: one per address
            else:
                keys = len(rows) if cf in FILTERED else 0
            emulated[cf] = emulated.get(cf, 0) + table_bytes(rows, LEVEL.get(cf, 3), keys)
            reported[cf] = reported.get(cf, 0) + int(size)
    print(f"{txs} txs; bytes per tx, emulated / as RocksDB reported them:")
    for cf in sorted(emulated, key=lambda cf: -reported[cf]):
        if reported[cf]:
            print(f"  {cf:14s} {emulated[cf] / txs:7.1f} {reported[cf] / txs:7.1f}")
    print(f"  {'all':14s} {sum(emulated.values()) / txs:7.1f} {sum(reported.values()) / txs:7.1f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: rocksdb_bytes.py <dump dir>...")
    main(sys.argv[1:])
