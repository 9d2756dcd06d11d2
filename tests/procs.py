"""Subprocesses of the tests: each in its own process group, watched until the whole group is
gone (a run's Grain workers and resource tracker included)."""

import os
import signal
import subprocess
import time


def group_members(pgid):
    """Live (non-zombie) processes of process group ``pgid``: {pid: command line}."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members[int(entry)] = cmdline
    return members


def wait_group_gone(pgid, timeout):
    """The members of ``pgid`` still alive after ``timeout`` seconds ({} when all are gone)."""
    deadline = time.time() + timeout
    while True:
        members = group_members(pgid)
        if not members or time.time() > deadline:
            return members
        time.sleep(0.1)


class Processes:
    """Start commands in new sessions; at the end, check and clean up their groups."""

    def __init__(self):
        self.started = []

    def start(self, cmd, **kwargs):
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(cmd, text=True, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def close(self, timeout=10):
        """Kill what still runs; return the groups with members alive ``timeout`` s later."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        left = {p.pid: wait_group_gone(p.pid, timeout) for p in self.started}
        left = {pgid: members for pgid, members in left.items() if members}
        for pgid in left:
            os.killpg(pgid, signal.SIGKILL)
        return left


def wait_until(condition, proc, timeout, what):
    """Poll ``condition()`` until true; fail if ``proc`` ended or ``timeout`` s passed first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}:\n{out}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
