"""Run a command; report its wall time and peak memory, counting mapped file pages separately.

    python scripts/peak_memory.py --json runs/scale/x.json --weights-of runs/random-1.1b -- \\
        crosslayer convert runs/random-1.1b --out runs/conv-x --cla-factor 2 --kv-init mean

How memory is measured (all figures in bytes in the JSON; GB = 10^9 bytes in the table):
- sampled: every --interval s (default 0.05) the process tree of COMMAND (its pid and every descendant,
  found through /proc/PID/task/*/children) is read from /proc/PID/status: VmRSS, RssAnon, RssFile,
  RssShmem (RSS = anon + file + shmem). The peaks are those of the tree's totals (sum over processes)
  and of each field on its own, so peak RSS and peak RssAnon may come from different samples. A spike
  shorter than the interval can be missed: the kernel's own figures below cannot miss one.
- vmhwm: each process's VmHWM (the kernel's RSS high-water mark), read at the last sample before it
  exited; the largest over the tree.
- ru_maxrss: wait4's ru_maxrss of COMMAND: the largest RSS high-water mark of COMMAND and every
  descendant it waited for (the kernel's figure, what /usr/bin/time reports).
- time_v: with /usr/bin/time present (and not --no-time), COMMAND runs under `/usr/bin/time -v` and its
  "Maximum resident set size" is recorded too; /usr/bin/time itself is then left out of the tree.
RSS counts the pages of files mapped into the process (safetensors are read through mmap) that are
resident: RssFile. They are clean page-cache pages the kernel can drop and reread under pressure, so
RssAnon is the memory the command truly needs; both are reported, and their ratios to the weights.

--weights-bytes N or --weights-of FOLDER (the sum of its *.safetensors sizes) adds peak RSS / weights
and peak RssAnon / weights. Prints one table line; the JSON holds the command, return code, wall time,
peaks, ratios, the CPU model (/proc/cpuinfo) and the date. Exits with COMMAND's return code.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
TIME = "/usr/bin/time"


def read_status(pid: int) -> dict[str, int] | None:
    """The memory fields of /proc/PID/status in bytes; None once the process is gone (a zombie has none)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024  # kB
    return out if "VmRSS" in out else None


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the children files of its threads; a child of any thread counts)."""
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return kids
    for tid in tasks:
        try:
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def tree(root: int, include_root: bool = True) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    return pids if include_root else pids[1:]


class Sampler(threading.Thread):
    """Sums the tree's memory fields every `interval` seconds and keeps the peaks."""

    def __init__(self, root: int, include_root: bool, interval: float):
        super().__init__(daemon=True)
        self.root, self.include_root, self.interval = root, include_root, interval
        self.peak = {k: 0 for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        self.at_peak_rss: dict[str, int] = {}  # the fields of the sample with the largest total RSS
        self.hwm: dict[int, int] = {}  # pid -> last VmHWM seen
        self.samples, self.max_processes = 0, 0
        self.done = threading.Event()

    def sample(self) -> None:
        total = {k: 0 for k in self.peak}
        n = 0
        for pid in tree(self.root, self.include_root):
            status = read_status(pid)
            if status is None:
                continue
            n += 1
            for k in total:
                total[k] += status.get(k, 0)
            if "VmHWM" in status:
                self.hwm[pid] = status["VmHWM"]
        for k in total:
            self.peak[k] = max(self.peak[k], total[k])
        if total["VmRSS"] >= self.at_peak_rss.get("VmRSS", -1):
            self.at_peak_rss = dict(total)
        self.samples += 1
        self.max_processes = max(self.max_processes, n)

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)


def weights_bytes(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        sys.exit(f"error: {folder} holds no *.safetensors")
    return sum(f.stat().st_size for f in files)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_v_max_rss(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if "Maximum resident set size" in line:
                return int(line.rsplit(":", 1)[1]) * 1024  # kbytes
    except (OSError, ValueError):
        pass
    return None


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def measure(command: list[str], interval: float = 0.05, use_time: bool = True, weights: int | None = None) -> dict:
    """Run `command` to its end under the sampler; the figures as a dict (see the module docstring)."""
    use_time = use_time and os.access(TIME, os.X_OK)
    with tempfile.TemporaryDirectory() as tmp:
        time_out = Path(tmp) / "time.txt"
        argv = [TIME, "-v", "-o", str(time_out), *command] if use_time else list(command)
        start = time.perf_counter()
        proc = subprocess.Popen(argv)
        sampler = Sampler(proc.pid, include_root=not use_time, interval=interval)
        sampler.start()
        forward = {s: signal.signal(s, lambda signum, _: proc.send_signal(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        finally:
            for s, h in forward.items():
                signal.signal(s, h)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join()
        time_v = time_v_max_rss(time_out) if use_time else None
    peak = sampler.peak
    result = {
        "command": command, "command_line": shlex.join(command), "returncode": proc.returncode,
        "wall_s": round(wall, 3),
        "peak_bytes": {"rss": peak["VmRSS"], "anon": peak["RssAnon"], "file": peak["RssFile"],
                       "shmem": peak["RssShmem"]},
        "at_peak_rss_bytes": {"rss": sampler.at_peak_rss.get("VmRSS", 0), "anon": sampler.at_peak_rss.get("RssAnon", 0),
                              "file": sampler.at_peak_rss.get("RssFile", 0),
                              "shmem": sampler.at_peak_rss.get("RssShmem", 0)},
        "vmhwm_bytes": max(sampler.hwm.values(), default=None),
        "ru_maxrss_bytes": rusage.ru_maxrss * 1024,  # of COMMAND (or of /usr/bin/time's child) and its waited-for children
        "time_v_max_rss_bytes": time_v,
        "time_v": use_time,
        "samples": sampler.samples, "interval_s": interval, "max_processes": sampler.max_processes,
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "kernel": platform.release(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "method": "sum over the process tree of /proc/PID/status VmRSS, RssAnon, RssFile, RssShmem sampled every "
                  f"{interval} s (peaks of each sum); vmhwm = largest VmHWM seen; ru_maxrss from wait4; "
                  "time_v = /usr/bin/time -v Maximum resident set size",
    }
    if weights:
        result["weights_bytes"] = weights
        result["ratio"] = {"rss": round(peak["VmRSS"] / weights, 3), "anon": round(peak["RssAnon"] / weights, 3),
                           "ru_maxrss": round(result["ru_maxrss_bytes"] / weights, 3)}
    return result


def table_line(r: dict) -> str:
    p = r["peak_bytes"]
    line = (f"wall {r['wall_s']:.1f} s  peak RSS {gb(p['rss'])} GB (peaks: anon {gb(p['anon'])}, file {gb(p['file'])}, "
            f"shmem {gb(p['shmem'])})  VmHWM {gb(r['vmhwm_bytes'])}  ru_maxrss {gb(r['ru_maxrss_bytes'])}  "
            f"time -v {gb(r['time_v_max_rss_bytes'])} GB")
    if "ratio" in r:
        line += f"  RSS/weights {r['ratio']['rss']:.2f}x  anon/weights {r['ratio']['anon']:.2f}x"
    return line + f"  rc {r['returncode']}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    ap = argparse.ArgumentParser(usage="peak_memory.py [--json OUT] [--weights-bytes N | --weights-of DIR] -- COMMAND ...")
    ap.add_argument("--json", type=Path, help="write the figures here")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--weights-bytes", type=int)
    group.add_argument("--weights-of", type=Path, help="folder: sum of its *.safetensors sizes")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between samples (default 0.05)")
    ap.add_argument("--no-time", action="store_true", help="do not run under /usr/bin/time -v")
    ap.add_argument("--label", help="a name kept in the JSON")
    args = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        ap.error("no COMMAND after --")
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        sys.exit(f"error: {command[0]}: command not found")
    weights = args.weights_bytes or (weights_bytes(args.weights_of) if args.weights_of else None)
    result = measure(command, args.interval, not args.no_time, weights)
    if args.label:
        result = {"label": args.label, **result}
    if args.weights_of:
        result["weights_of"] = str(args.weights_of)
    print(table_line(result), file=sys.stderr, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
