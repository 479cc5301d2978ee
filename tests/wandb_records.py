"""Reads an offline W&B run (``<run dir>/wandb/offline-run-*/run-*.wandb``) for the tests: its name, group, config,
summary, history and exit code. wandb 0.31 writes neither ``files/config.yaml`` nor ``wandb-summary.json`` offline and
ships no reader; the file is a LevelDB-style log (32 KiB blocks of 7-byte-headed chunks) of ``wandb_internal_pb2.Record``
protobufs after an 7-byte ``:W&B`` header."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            yield buf + chunk
            buf = b""


def read_run(offline_dir: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(offline_dir).glob("run-*.wandb")
    out = {"name": None, "group": None, "job_type": None, "config": {}, "summary": {}, "history": [], "exit_code": None}
    for raw in _records(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def runs_in(run_dir: Path) -> list[dict]:
    return [read_run(d) for d in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]
