"""Set-up for the real-browser tests: Debian's Chromium, driven by Playwright, no browser downloads.

`ensure_chromium()` finds the system Chromium; where it is missing and we are root on a Debian-like
machine it installs Debian's `chromium` package itself (once per machine: a lock file stops two
test processes from racing apt, and a failure marker stops every later run from retrying a broken
install for an hour).  Only when Chromium truly cannot be had (not root, no apt, apt failed) does
it return a reason, which the tests turn into a skip that says exactly why and where the log is.

`launch_browser(playwright, user_data_dir)` starts that Chromium headless with the flags a machine
with a closed network needs (no background connections, no QUIC, no component updates).  We never
run `playwright install`: the Python wheel bundles only its driver, and `executable_path` points at
the system binary.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

# Where Debian (and Ubuntu's transitional package) put the binary; STYLEMIX_CHROMIUM overrides.
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
APT_PACKAGE = "chromium"
INSTALL_TIMEOUT_S = int(os.environ.get("STYLEMIX_CHROMIUM_INSTALL_TIMEOUT", "900"))  # update + install, in all
RETRY_AFTER_S = 3600  # a failed install is not retried by every test run on the same machine
STATE_DIR = Path(os.environ.get("STYLEMIX_BROWSER_STATE", "/tmp/stylemix-browser-setup"))
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
INSTALL_LOG = ARTIFACTS / "chromium-install.log"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # root in a container: the setuid sandbox is unavailable
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the closed network refuses these; they only add noise and delays
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers makes renderers crash
]


def find_chromium() -> str | None:
    override = os.environ.get("STYLEMIX_CHROMIUM")
    for path in ([override] if override else []) + list(CHROMIUM_PATHS):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _run_logged(cmd: list[str], log, timeout: float) -> int:
    log.write(f"\n$ {' '.join(cmd)}   (timeout {timeout:.0f}s)\n")
    log.flush()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log.write(f"\n!! timed out after {timeout:.0f}s\n")
        return 124


def _install_with_apt() -> str | None:
    """Install Debian's chromium; returns None on success, else why it failed."""
    INSTALL_LOG.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    with open(INSTALL_LOG, "a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} installing Debian's {APT_PACKAGE} for the browser tests\n")
        rc = _run_logged(["apt-get", "update"], log, max(1.0, deadline - time.monotonic()))
        if rc != 0:
            return f"`apt-get update` failed (exit {rc})"
        rc = _run_logged(["apt-get", "install", "-y", "--no-install-recommends", APT_PACKAGE], log,
                         max(1.0, deadline - time.monotonic()))
        if rc != 0:
            return f"`apt-get install {APT_PACKAGE}` failed (exit {rc})"
    return None


def ensure_chromium() -> tuple[str | None, str | None]:
    """(path to Chromium, None), or (None, the reason it cannot be had on this machine)."""
    path = find_chromium()
    if path:
        return path, None
    if not shutil.which("apt-get"):
        return None, f"Chromium is not installed ({', '.join(CHROMIUM_PATHS)}) and this machine has no apt-get"
    if os.geteuid() != 0:
        return None, (f"Chromium is not installed ({', '.join(CHROMIUM_PATHS)}) and the tests are not running "
                      f"as root, so they cannot apt-get install {APT_PACKAGE}; install it once with "
                      f"`sudo apt-get install -y --no-install-recommends {APT_PACKAGE}`")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    failed = STATE_DIR / "install-failed"
    with open(STATE_DIR / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second pytest process waits here, then finds the binary
        path = find_chromium()
        if path:
            return path, None
        if failed.exists() and time.time() - failed.stat().st_mtime < RETRY_AFTER_S:
            return None, (f"{failed.read_text().strip()} (not retried for an hour: delete {failed} to retry now)")
        why = _install_with_apt()
        path = find_chromium()
        if path:
            failed.unlink(missing_ok=True)
            return path, None
        reason = f"Chromium could not be installed: {why or 'the package installed no binary'}; log: {INSTALL_LOG}"
        failed.write_text(reason)
        return None, reason


def launch_browser(playwright, executable_path: str, user_data_dir: Path):
    """A headless persistent context on the system Chromium, with a fresh profile folder."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=executable_path, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 1000}, timeout=60_000)
