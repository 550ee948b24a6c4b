#!/usr/bin/env python3
"""Hashes of a converted dataset's data, to show that a change of the converter kept it.

Data: every Zarr chunk or shard file (its bytes) and every Parquet column (its values, through
pyarrow, so a change of the file's metadata alone does not count). Metadata: every `zarr.json`
and the Parquet files' schemas and key-value metadata, which may change where the pipeline's
text changes (its hash is recorded there). `run.json`, `manifest.json` and `lock.json` are left
out: they record times, hosts and the tool itself.

    python benches/output_hashes.py STORE/NAME [--per-file]

Prints `data <blake3>` and `metadata <blake3>` (and one line per file with --per-file). Two
datasets hold the same data exactly when their `data` lines agree.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pyarrow.parquet as pq

SKIPPED = {"run.json", "manifest.json", "lock.json"}


def column_digest(column) -> str:
    h = hashlib.blake2b(digest_size=32)
    for chunk in column.chunks:
        for buffer in chunk.buffers():
            if buffer is not None:
                h.update(buffer)
        h.update(str(chunk.type).encode())
    return h.hexdigest()


def parquet_digests(path: Path) -> tuple[dict[str, str], str]:
    table = pq.read_table(path)
    data = {f"{path.name}:{name}": column_digest(table.column(name)) for name in table.column_names}
    meta = hashlib.blake2b(str(table.schema).encode() + repr(table.schema.metadata).encode(),
                           digest_size=32).hexdigest()
    return data, meta


def digests(dataset: Path) -> tuple[dict[str, str], dict[str, str]]:
    data: dict[str, str] = {}
    meta: dict[str, str] = {}
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        rel = path.relative_to(dataset).as_posix()
        if rel in SKIPPED or path.name.startswith("."):
            continue
        if path.suffix == ".parquet":
            columns, schema = parquet_digests(path)
            data.update({f"{rel}:{k.split(':', 1)[1]}": v for k, v in columns.items()})
            meta[rel] = schema
        elif path.name == "zarr.json":
            meta[rel] = hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()
        else:
            data[rel] = hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()
    return data, meta


def summary(parts: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for key in sorted(parts):
        h.update(f"{key}\t{parts[key]}\n".encode())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--per-file", action="store_true")
    args = ap.parse_args(argv)
    if not (args.dataset / "manifest.json").exists():
        print(f"{args.dataset}: no manifest.json, not a complete dataset", file=sys.stderr)
        return 2
    data, meta = digests(args.dataset)
    if args.per_file:
        for key in sorted(data):
            print(f"data     {data[key]}  {key}")
        for key in sorted(meta):
            print(f"metadata {meta[key]}  {key}")
    print(f"data {summary(data)} ({len(data)} files and columns)")
    print(f"metadata {summary(meta)} ({len(meta)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
