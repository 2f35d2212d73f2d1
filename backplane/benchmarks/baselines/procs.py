"""Running one engine process: request file in, one JSON result line out, peak RSS measured.

Runners print their result as one line starting with ``RESULT_MARKER`` on stdout:
vLLM and others log freely to stdout, so the marker (not "the last line") finds it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

RESULT_MARKER = "BACKPLANE_BASELINE_RESULT "


def _rss_by_pid() -> tuple[dict[int, int], dict[int, list[int]]]:
    """RSS bytes of every process and each one's children, read from /proc/*/stat."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss, children = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                # The command name may hold spaces and parentheses: split after the last ")".
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        pid, ppid = int(name), int(fields[1])
        rss[pid] = int(fields[21]) * page
        children.setdefault(ppid, []).append(pid)
    return rss, children


def tree_rss_bytes(root: int) -> int:
    """Summed RSS of ``root`` and all its descendants now (0 where /proc is absent).

    Shared pages (a weights file mapped by two processes) count once per process,
    so this can overstate; it is the figure that sees vLLM's engine-core child."""
    if not os.path.isdir("/proc"):
        return 0
    rss, children = _rss_by_pid()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class TreeRssSampler:
    """Samples the summed RSS of a process tree in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def wait_with_rusage(proc: subprocess.Popen, timeout_s: float | None = None) -> int:
    """Wait for ``proc``; its own ru_maxrss in bytes (Linux reports KiB).

    ``os.wait4`` gives this child's rusage alone, where RUSAGE_CHILDREN would mix
    in every earlier engine process of the run. Popen is told the exit status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return int(usage.ru_maxrss) * 1024
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        time.sleep(0.1)  # the parent's polling must not take CPU from the engine measured


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (started with start_new_session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    if proc.returncode is None:
        try:
            wait_with_rusage(proc)
        except ChildProcessError:
            pass  # already reaped


@dataclass
class ProcessResult:
    """What a runner printed, plus what the parent measured of its process."""

    result: dict
    peak_rss_bytes: int
    peak_tree_rss_bytes: int
    process_seconds: float
    log_tail: str = ""
    extra: dict = field(default_factory=dict)


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def parse_result(stdout_text: str) -> dict | None:
    """The JSON after the last RESULT_MARKER line, None if the runner printed none."""
    found = None
    for line in stdout_text.splitlines():
        if line.startswith(RESULT_MARKER):
            found = json.loads(line[len(RESULT_MARKER):])
    return found


def run_runner(cmd: list[str], env: dict[str, str], log_dir: str, label: str,
               timeout_s: float | None = None) -> ProcessResult:
    """Run one runner command to completion; its stdout/stderr go to files under log_dir."""
    out_path = os.path.join(log_dir, f"{label}.stdout")
    err_path = os.path.join(log_dir, f"{label}.stderr")
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # A session of its own: on a timeout or Ctrl-C the whole group goes, vLLM's
        # engine-core and worker processes included, not just the front end.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        sampler = TreeRssSampler(proc.pid)
        try:
            peak = wait_with_rusage(proc, timeout_s)
        except BaseException:
            kill_group(proc)
            raise
        finally:
            tree_peak = sampler.stop()
    seconds = time.perf_counter() - start
    with open(out_path, errors="replace") as f:
        result = parse_result(f.read())
    if proc.returncode != 0 or result is None:
        raise RuntimeError(
            f"{label}: `{' '.join(cmd)}` exited with {proc.returncode} "
            f"{'and printed no result' if result is None else ''}; stderr tail:\n"
            f"{_tail(err_path)}\nstdout tail:\n{_tail(out_path, 1500)}")
    return ProcessResult(result=result, peak_rss_bytes=peak, peak_tree_rss_bytes=tree_peak,
                         process_seconds=seconds, log_tail=_tail(err_path, 1500))
