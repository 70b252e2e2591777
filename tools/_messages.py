"""Error messages in command-line terms.

The library's errors speak Python (``dpsn.open(path, mode="r+")``, ``pool.drop(rows)``): right
for a caller of the API, wrong on a terminal. The CLI passes every error through here, which
says the same thing with the command or flag a shell user would type, and names the process
that holds a store's writer lock.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dpsn.errors import CorruptSegmentError, StoreLockedError

# (pattern, replacement) applied in order; ``{path}`` and ``{command}`` are filled in.
_REWRITES: list[tuple[str, str]] = [
    (
        r"Create one with dpsn\.create\(path, rows, dim\) or `dpsn create`\.",
        "Create one with `dpsn create {path} --rows N --dim D`.",
    ),
    (
        r"`?pool\.drop\(rows\)`? returns them to procedural\.?",
        "`dpsn drop {path} ROW...` returns them to procedural.",
    ),
    (
        r"use pool\.snapshot\(name\) to keep a commit\.?",
        "pin a commit with `dpsn snapshot {path} NAME` to keep it.",
    ),
    (r"open it with dpsn\.open\(path, mode=\"r\+\"\) to change it", "use a command that writes"),
    (r"open it with mode=\"r\+\" to change it\.?", "use a command that writes."),
    (r"mode=\"r\+\"", "writing"),
    (r"mode=\"r\"", "read-only"),
    (r"\bat=", "--at "),
]


def cli_message(error: BaseException, *, command: str, path: str | None) -> str:
    """The text to print for ``error`` raised by ``dpsn <command>`` on store ``path``."""
    if isinstance(error, StoreLockedError) and path is not None:
        return locked_message(Path(path), command)
    text = str(error) or type(error).__name__
    if isinstance(error, CorruptSegmentError) and command == "verify":
        text = re.sub(r"\s*Run `dpsn verify` for the full list;?", "", text)
    else:
        text = text.replace("Run `dpsn verify` for", f"Run `dpsn verify {path or 'PATH'}` for")
    for pattern, replacement in _REWRITES:
        text = re.sub(pattern, replacement.format(path=path or "PATH", command=command), text)
    return text


def locked_message(path: Path, command: str) -> str:
    holder = lock_holder(path / "writer.lock")
    who = "another process"
    if holder is not None:
        pid, cmdline = holder
        who = f"process {pid}" + (f" ({cmdline})" if cmdline else "")
        if pid == os.getpid():
            who = "this process"
    return (
        f"{path} is open for writing by {who}, which holds its writer lock {path / 'writer.lock'}; "
        f"`dpsn {command}` needs that lock. Let that writer finish (or stop it) and run "
        f"`dpsn {command}` again; read-only commands (info, log, inspect, verify, export) work "
        "meanwhile."
    )


def lock_holder(lock_file: Path) -> tuple[int, str] | None:
    """The pid (and command line) of the process holding ``flock`` on ``lock_file``, from
    ``/proc/locks`` (Linux); None where that cannot be told."""
    try:
        st = lock_file.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in locks.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:1234567 0 EOF" (a "->" marks blocked waiters)
        if len(parts) < 6 or parts[1] != "FLOCK" or "->" in parts:
            continue
        dev_inode = parts[5].split(":")
        if len(dev_inode) != 3 or not dev_inode[2].isdigit() or not parts[4].isdigit():
            continue
        if int(dev_inode[2]) != st.st_ino:
            continue
        major, minor = int(dev_inode[0], 16), int(dev_inode[1], 16)
        if (major, minor) != (os.major(st.st_dev), os.minor(st.st_dev)):
            continue
        pid = int(parts[4])
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            # one line whatever the holder's arguments hold (a `python -c` script has newlines)
            cmdline = " ".join(raw.decode("utf-8", "replace").replace("\0", " ").split())
        except OSError:
            cmdline = ""
        if len(cmdline) > 80:
            cmdline = cmdline[:77] + "..."
        return pid, cmdline
    return None
