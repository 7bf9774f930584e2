"""Make a venv built under a staging root work at its final path, reproducibly.

    python3 fixup_venv.py STAGE FINAL_VENV

The venv was created and filled at STAGE + FINAL_VENV. Every text file that names the staging
path (console script shebangs, activate scripts, pyvenv.cfg) is rewritten to name FINAL_VENV;
the RECORD of each installed distribution gets the new hashes and sizes of what was rewritten;
bytecode and pip's per-install files that vary between builds are removed (the package's
postinst compiles bytecode on the target). Standard library only.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import sys


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def main(stage: str, final: str) -> int:
    venv = stage.rstrip("/") + final
    staged_prefix = venv.encode()
    changed: dict[str, bytes] = {}
    removed: set[str] = set()
    for folder, dirs, files in os.walk(venv):
        dirs.sort()
        for name in list(dirs):
            if name == "__pycache__":
                shutil.rmtree(os.path.join(folder, name))
                dirs.remove(name)
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            if name.endswith((".pyc", ".pyo")) or (name in ("direct_url.json", "REQUESTED", "INSTALLER")
                                                    and folder.endswith(".dist-info")):
                os.unlink(path)
                removed.add(os.path.realpath(path))
                continue
            with open(path, "rb") as f:
                data = f.read()
            if staged_prefix in data:
                data = data.replace(staged_prefix, final.encode())
                with open(path, "wb") as f:
                    f.write(data)
                changed[os.path.realpath(path)] = data
    # pyvenv.cfg: `command = ... -m venv <staging path>` names the build folder; keep it final
    cfg = os.path.join(venv, "pyvenv.cfg")
    with open(cfg, encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("command")]
    with open(cfg, "w", encoding="utf-8") as f:
        f.writelines(lines)
    for line in lines:
        if stage in line:
            print(f"fixup_venv: {cfg} still names the staging folder: {line.strip()}", file=sys.stderr)
            return 1
    _fix_records(venv, changed, removed)
    # include/ (for building C extensions in the venv) stays empty: not shipped
    include = os.path.join(venv, "include")
    if os.path.isdir(include):
        shutil.rmtree(include)
    leftover = []
    for folder, _dirs, files in os.walk(venv):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    if staged_prefix in f.read():
                        leftover.append(path)
    if leftover:
        print("fixup_venv: still naming the staging folder: " + ", ".join(leftover), file=sys.stderr)
        return 1
    return 0


def _fix_records(venv: str, changed: dict[str, bytes], removed: set[str]) -> None:
    for folder, _dirs, files in os.walk(venv):
        if not folder.endswith(".dist-info") or "RECORD" not in files:
            continue
        record = os.path.join(folder, "RECORD")
        base = os.path.dirname(folder)  # site-packages: RECORD paths are relative to it
        with open(record, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        out = []
        for row in rows:
            if not row:
                continue
            target = os.path.realpath(os.path.join(base, row[0]))
            if target in removed or row[0].endswith(".pyc"):
                continue
            if target in changed:
                data = changed[target]
                row = [row[0], _record_hash(data), str(len(data))]
            out.append(row)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(sorted(out, key=lambda r: r[0]))
        with open(record, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
