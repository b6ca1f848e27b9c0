"""Read back what an offline W&B run wrote: the records of its ``run-<id>.wandb`` files.

The forwarder (``deepscaler.tracking``) asks them which steps W&B really has after a restart:
a killed writer loses what W&B had not written yet. wandb 0.31 dropped its Python reader
(``wandb.sdk.internal.datastore``), so this reads the format itself: a 7-byte header (``:W&B``, magic, version), then LevelDB-style log records in
32 KiB blocks (CRC32, length, type: full, first, middle, last), each a protobuf ``Record``.
A record cut short by a killed writer ends the scan."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The protobuf records of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        return  # empty (killed before its header), or not a W&B file
    pos, parts = HEADER, []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room  # zero padding to the end of the block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            return  # cut short
        pos += 7 + length
        parts.append(chunk)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def attempts(run_dir: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of run ``run_id``, oldest first. Each attempt writes
    ``offline-run-<time>-<id>``; W&B appends ``-<n>`` when an attempt starts within the same
    second as the one before."""
    def order(path: Path):
        time, _, suffix = path.parent.name[len("offline-run-"):].partition(f"-{run_id}")
        return time, int(suffix[1:]) if suffix[1:].isdigit() else 0

    found = [p for pattern in (f"offline-run-*-{run_id}", f"offline-run-*-{run_id}-*")
             for p in run_dir.glob(f"{pattern}/run-{run_id}.wandb")]
    return sorted(found, key=order)


def history(run_dir: Path, run_id: str) -> list[dict]:
    """Every history row of run ``run_id`` in the offline runs under ``run_dir``, oldest first
    (a resumed run writes one ``offline-run-*-<id>`` folder per attempt)."""
    rows = []
    for path in attempts(run_dir, run_id):
        for rec in records(path):
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows
