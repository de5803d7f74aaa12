"""Headless Chromium driven over the DevTools protocol, for the browser tests (the run report, the docs site).

Tests that use it skip when ``CHROMIUM`` is None (``apt-get install chromium``)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync")
IMAGE_CHECK = "JSON.stringify([...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]))"


class DevTools:
    """Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON)."""

    def __init__(self, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # move both ends above 4 first, so neither dup2 can clobber the other
            high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            args, preexec_fn=child_fds, pass_fds=(3, 4, to_chrome_r, from_chrome_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._next_id, self.events = b"", 0, []

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next_id, timeout)
        assert "error" not in reply, reply
        return reply["result"]

    def wait(self, match, timeout: float = 60) -> dict:
        """The first message (reply or event, including events already received) that ``match``es."""
        for event in self.events:
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                if match(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def open_tab(self) -> str:
        """A new tab with the Page, Runtime, Log and Network events on; returns its session id."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        return session

    def load(self, session: str, url: str, timeout: float = 60) -> list[dict]:
        """Navigate ``session`` to ``url``; the events this page produced up to its load event."""
        start = len(self.events)
        self.send("Page.navigate", session, url=url)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session
                  and self.events.index(m) >= start, timeout)
        return [e for e in self.events[start:] if e.get("sessionId") == session]

    def evaluate(self, session: str, expression: str):
        return self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"]["value"]

    def close(self) -> None:
        try:
            os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def errors(events: list[dict], allowed_prefixes: tuple[str, ...] = ("file:", "data:")) -> list[dict]:
    """Exceptions, console errors, failed loads, and requests to any URL outside ``allowed_prefixes``."""
    bad = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown" or m == "Network.loadingFailed":
            bad.append(e)
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            bad.append(e)
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            bad.append(e)
        elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(allowed_prefixes):
            bad.append(e)  # nothing may be loaded from the network
    return bad
