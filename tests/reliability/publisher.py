"""A trainer stand-in that publishes a copy of an existing version and can stop at a chosen point.

    python -m tests.reliability.publisher VALUES_DIR NAME SOURCE_VERSION_DIR POINT

At POINT it prints `BLOCKED <point>` and waits to be killed; with POINT `none` it publishes and
prints `PUBLISHED <version>`. Points, in publish order:
    before_files   temp dir created, nothing written
    mid_adapter    half of adapter.safetensors written
    mid_head       adapter written, half of head.safetensors
    after_files    both files written and hashed, no manifest yet
    mid_manifest   half of manifest.json written (temp dir not yet renamed)
    before_current version dir renamed into place, CURRENT not yet replaced
    mid_current    new CURRENT written to its temp file, not yet renamed over CURRENT
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import registry.local as registry_module
from valuefn.checkpoint import ADAPTER_FILE, HEAD_FILE, sha256_file
from valuefn.registry import Registry

POINTS = ("before_files", "mid_adapter", "mid_head", "after_files", "mid_manifest", "before_current", "mid_current")


def main(root: str, name: str, source: str, point: str) -> None:
    src = Path(source)

    def block(at: str) -> None:
        if at == point:
            print(f"BLOCKED {at}", flush=True)
            while True:
                signal.pause()  # until SIGKILL

    def write(tmp: Path) -> dict[str, str]:
        block("before_files")
        for filename, at in ((ADAPTER_FILE, "mid_adapter"), (HEAD_FILE, "mid_head")):
            data = (src / filename).read_bytes()
            with open(tmp / filename, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
                block(at)
                out.write(data[len(data) // 2:])
        files = {f: sha256_file(tmp / f) for f in (ADAPTER_FILE, HEAD_FILE)}
        block("after_files")
        return files

    write_durable, set_current, replace = registry_module._write_durable, Registry.set_current, os.replace

    def half_then_rest(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        block("mid_manifest")
        write_durable(path, data)

    def current_after_block(self, value: str, version: int) -> None:
        block("before_current")
        set_current(self, value, version)

    def replace_after_block(src_path, dst_path, *args, **kw):
        if str(dst_path).endswith(registry_module.CURRENT):
            block("mid_current")
        return replace(src_path, dst_path, *args, **kw)

    registry_module._write_durable = half_then_rest
    Registry.set_current = current_after_block
    os.replace = replace_after_block
    manifest = json.loads((src / "manifest.json").read_text())
    version = Registry(root).publish(name, write, manifest)
    print(f"PUBLISHED {version}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
