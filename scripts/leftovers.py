#!/usr/bin/env python3
"""Run a command, then make sure that nothing it started is still running.

    scripts/leftovers.py -- CMD [ARGS...]

This process becomes a child subreaper (PR_SET_CHILD_SUBREAPER) before it
starts CMD, so every process CMD starts stays its descendant however it
detaches: a daemon that left its session, a sandbox's init that outlives its
daemon, a tmux server, a model worker. What is left when CMD ends is then
exactly what CMD started and did not stop.

When CMD ends:

1. Every moat daemon left (the test suite's shared daemons, which no single
   test owns) is asked which sandboxes it still runs; those are reported as
   leaked, then removed through the daemon (`moat sandbox reset -f`), and the
   daemon is stopped (SIGTERM, then SIGKILL after 10 s).
2. Whatever else is left after a grace period is reported with its command
   line, and killed.

The exit status is CMD's; a leak turns success into 3, so that a suite that
leaves something behind fails. A bench calls `watch_this_script()` first
thing, which runs it again under this wrapper.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36

# Seconds the survivors get to end by themselves once their daemons are gone
# (a model worker ends when its socket closes; init when its sandbox is removed).
GRACE = 20


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap():
    """Collect every exited child (orphans re-parented to us included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def parents():
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        out[int(entry)] = int(fields[1])
    return out


def descendants(root=None):
    """The live (not zombie) processes below `root` (this process)."""
    root = root or os.getpid()
    tree = parents()
    found, grew = set(), True
    while grew:
        grew = False
        for pid, ppid in tree.items():
            if pid not in found and (ppid == root or ppid in found):
                found.add(pid)
                grew = True
    return sorted(found)


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return []
    return [a.decode(errors="replace") for a in argv if a]


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = f.read().split(b"\0")
    except OSError:
        return {}
    env = {}
    for p in pairs:
        k, sep, v = p.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def owner(pid):
    try:
        st = os.stat(f"/proc/{pid}")
    except OSError:
        return None
    return st.st_uid, st.st_gid


def describe(pid):
    return f"  pid {pid}: {' '.join(cmdline(pid))[:200]}"


def moat_daemons():
    """(pid, exe, env, (uid, gid)) of every moat daemon below us."""
    found = []
    for pid in descendants():
        argv = cmdline(pid)
        if len(argv) >= 2 and argv[1] == "daemon" and os.path.basename(argv[0]) == "moat":
            env = environ(pid)
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if "MOAT_HOME" in env and "MOAT_RUNTIME_DIR" in env:
                found.append((pid, exe.removesuffix(" (deleted)"), env, owner(pid)))
    return found


def moat_as(exe, env, ids, args, timeout=120):
    """`moat ARGS` against a daemon, as the user it runs as."""
    run_env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": env.get("HOME", "/tmp"),
        "MOAT_HOME": env["MOAT_HOME"],
        "MOAT_RUNTIME_DIR": env["MOAT_RUNTIME_DIR"],
    }

    def switch():
        if ids and os.getuid() == 0 and ids[0] != 0:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])

    return subprocess.run([exe] + args, env=run_env, preexec_fn=switch, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reap()
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and p in descendants()]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def stop_daemon(pid, exe, env, ids, report):
    """Remove what the daemon still runs (reporting it when `report`), then stop it."""
    where = env["MOAT_HOME"]
    try:
        listed = moat_as(exe, env, ids, ["sandbox", "ls", "--json"])
        sandboxes = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        sandboxes = []
    names = [s.get("name") or s.get("Name") or str(s) for s in sandboxes]
    if names and report:
        print(f"leftovers: the daemon of {where} still runs sandboxes: {', '.join(names)}", file=sys.stderr)
    if names:
        try:
            moat_as(exe, env, ids, ["sandbox", "reset", "-f"], timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"leftovers: `moat sandbox reset -f` on {where} failed: {e}", file=sys.stderr)
    try:
        os.kill(pid, signal.SIGTERM)
        if wait_gone([pid], 10):
            os.kill(pid, signal.SIGKILL)
            wait_gone([pid], 5)
    except OSError:
        pass
    return names


def stop_leftovers(report=True, homes=None):
    """Stop what is still running below us; returns the leaks, as lines.
    Daemons are looked for until the end, since one may start late (a
    command that was still starting it when CMD ended); the grace starts
    again after each one stopped. The state roots of the daemons stopped
    are added to `homes`."""
    leaks = []
    deadline = time.monotonic() + GRACE
    while True:
        for pid, exe, env, ids in moat_daemons():
            for name in stop_daemon(pid, exe, env, ids, report):
                leaks.append(f"  sandbox {name} of the daemon of {env['MOAT_HOME']}")
            if homes is not None:
                homes.add(env["MOAT_HOME"])
            deadline = time.monotonic() + GRACE
        reap()
        survivors = descendants()
        if not survivors:
            return leaks
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lines = [describe(p) for p in survivors]
    leaks.extend(lines)
    if report:
        print(f"leftovers: still running {GRACE} s after the command ended, now killed:", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)
    for p in survivors:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    wait_gone(survivors, 10)
    return leaks


def unmount_below(root):
    """Detach the mounts below `root`, the state root of a daemon stopped
    here: a daemon killed while its disk pool makes an image leaves that
    image's mount, which its next daemon would undo (see disk/pool.rs);
    these daemons have no next one. Not a leak of CMD's: this process
    killed them."""
    root = os.path.realpath(root)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4].replace("\\040", " ")
            if point.startswith(root + "/"):
                points.append(point)
    for point in sorted(points, key=lambda p: -p.count("/")):
        print(f"leftovers: unmounting {point} (left by a stopped daemon)", file=sys.stderr)
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)


# Set in CMD's environment, so that a script that watches itself runs once.
WATCHED = "MOAT_LEFTOVERS_WATCHED"


def watch_this_script():
    """Run the calling script again under `main` (a bench's first line), so
    that it leaves nothing running whatever way it ends."""
    if os.environ.get(WATCHED):
        return
    script = os.path.abspath(sys.argv[0])
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), "--", sys.executable, script]
             + sys.argv[1:])


def main(argv):
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: scripts/leftovers.py -- CMD [ARGS...]", file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1:]
    become_subreaper()
    child = subprocess.Popen(cmd, env=dict(os.environ, **{WATCHED: "1"}))
    # Ctrl-C reaches CMD (same process group); this process stays to clean up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    # Wait for CMD while reaping the orphans that come to us meanwhile.
    status = None
    while status is None:
        pid, raw = os.wait()
        if pid == child.pid:
            status = os.waitstatus_to_exitcode(raw)
    # Reaped here, so Popen must not wait for (or signal) its pid again.
    child.returncode = status
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    status = status if status >= 0 else 128 - status
    homes = set()
    leaks = stop_leftovers(homes=homes)
    for home in sorted(homes):
        unmount_below(home)
    # The last of them may have died just now: reap them here, since nothing
    # above us may (a container's pid 1 often does not).
    for _ in range(20):
        reap()
        time.sleep(0.1)
    if leaks:
        print(f"leftovers: {len(leaks)} thing(s) were left running by `{' '.join(cmd)}` (listed above)",
              file=sys.stderr)
        return status or 3
    print("leftovers: nothing left running", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
