"""Time to the first written row, rows over time, and peak resident memory of a `delia sample` command, run as
a child process the way a user runs it (model load included). The default is the long-prompt command of
docs/benchmarks.md ("Time to the first row on long prompts"):

    delia sample POOL OUT --limit 48 --max-prompt-tokens 2048 --max-new-tokens 48

on the demo pool (`demo-data:pool.jsonl`). `--src` runs another checkout's `src/` (e.g. the code before a change),
`--stop-after N` kills the command (SIGKILL, as a crash or an out-of-memory kill would) once N rows are written,
and then checks what a rerun resumes. Extra `delia sample` options go after `--`.

    flock /tmp/delia-heavy.lock .venv/bin/python benchmarks/sample_first_row.py
    flock /tmp/delia-heavy.lock .venv/bin/python benchmarks/sample_first_row.py --src /tmp/before/src --stop-after 1
    .venv/bin/python benchmarks/sample_first_row.py -- --batch-tokens 16384
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from delia.task_data import resolve_data_path


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of `pid` from /proc (0, 0 once it is gone)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return 0, 0
    kib = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` so far (0 once it is gone): less sensitive than wall time to other load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                    help="the delia source folder to run (default: this checkout's)")
    ap.add_argument("--pool", default="demo-data:pool.jsonl")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--stop-after", type=int, default=None, help="SIGKILL the command once this many rows are written")
    ap.add_argument("extra", nargs="*", help="more `delia sample` options (after --)")
    args = ap.parse_args()

    pool = resolve_data_path(args.pool)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        rejects = Path(tmp) / "out.rejects.jsonl"
        cmd = [sys.executable, "-m", "delia", "sample", str(pool), str(out), "--limit", str(args.limit),
               "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-new-tokens", str(args.max_new_tokens),
               *args.extra]
        env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
        print("$ PYTHONPATH=" + env["PYTHONPATH"], " ".join(cmd[1:]), flush=True)
        start = time.monotonic()
        child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        peak = 0
        seen = 0
        marks: list[tuple[float, int, int, float]] = []  # (seconds, rows written, resident bytes, CPU seconds)
        while child.poll() is None:
            rows = lines(out) + lines(rejects)
            rss, hwm = rss_bytes(child.pid)
            peak = max(peak, hwm)
            if rows > seen:
                seen = rows
                marks.append((time.monotonic() - start, rows, rss, cpu_seconds(child.pid)))
                print(f"{marks[-1][0]:7.1f} s: {rows:3d} rows written, resident {rss / 2**30:.2f} GiB, "
                      f"{marks[-1][3]:.0f} CPU s", flush=True)
                if args.stop_after is not None and rows >= args.stop_after:
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    break
            time.sleep(0.2)
        wall = time.monotonic() - start
        err = child.stderr.read() if child.stderr else ""
        if child.returncode not in (0, -signal.SIGKILL):
            sys.exit(f"delia sample failed ({child.returncode}):\n{err}")
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # exact, after wait()
        rows = lines(out) + lines(rejects)
        first = f"{marks[0][0]:.1f} s ({marks[0][3]:.0f} CPU s)" if marks else "none"
        print(f"first row after {first}; {rows} rows in {wall:.1f} s; load average {os.getloadavg()[0]:.1f} "
              f"({'killed' if child.returncode else 'finished'}); peak resident memory {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
