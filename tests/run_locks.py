"""Another process's hold on a run directory's ``run.lock``, for tests of what a busy or freed ``--out`` does."""
import contextlib
import os
import subprocess
import sys

_HOLD = ("import fcntl, sys, time\nhandle = open(sys.argv[1], 'a')\nfcntl.flock(handle.fileno(), fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\ntime.sleep(300)\n")
_PROBE = ("import fcntl, sys\nhandle = open(sys.argv[1], 'a')\n"
          "fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('locked')\n")


@contextlib.contextmanager
def held_run_lock(out):
    """Another process holding ``out``'s run.lock, as a live run does, for the duration."""
    os.makedirs(out, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, os.path.join(out, "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def another_process_can_lock(path) -> subprocess.CompletedProcess:
    """Try to take the lock file ``path`` from a new process without waiting; ``stdout`` is ``locked`` when
    it could (the result is returned whole, so a failing assertion can show its stderr)."""
    return subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=60)
