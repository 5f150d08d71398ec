"""Open an HTML report in headless Chromium and check it (a test helper; also usable by hand).

Not part of the package: it lives under ``tests/`` and is imported as ``from browser import …``
(pytest puts ``tests/`` on ``sys.path``). By hand: ``python tests/browser.py REPORT.html [--width 1400]``.

How it works
------------
Chromium is started with ``--remote-debugging-pipe``: it then speaks the Chrome DevTools Protocol
(CDP) over two inherited file descriptors, 3 (commands in) and 4 (events/replies out), as JSON
messages separated by NUL bytes. No TCP port, websocket library, playwright or puppeteer is needed;
only the Debian ``chromium`` package. The checker

1. starts ``chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
   --disable-background-networking --disable-component-update --disable-sync
   --user-data-dir=<fresh temporary folder> --remote-debugging-pipe about:blank``,
2. creates a page (``Target.createTarget``/``attachToTarget``, flat session), enables the
   ``Runtime``, ``Log``, ``Network`` and ``Page`` domains and sets a 1280 x 2000 viewport,
3. navigates to the report's ``file://`` URL and waits for the ``load`` event, then for the network
   to be idle (lazy images) — images are also forced to load eagerly,
4. collects **console errors** (``console.error``/``assert`` calls, uncaught exceptions, and log
   entries of level ``error``, e.g. ``Failed to load resource`` or Content-Security-Policy
   violations), **broken images** (``<img>`` that are not complete or have ``naturalWidth == 0``),
   **external requests** (any request whose URL is not ``file:``, ``data:``, ``blob:`` or
   ``about:`` — a self-contained report makes none),
5. takes a PNG screenshot (``Page.captureScreenshot``) and checks it is not blank: the share of
   pixels that differ from the most common colour must exceed :data:`BLANK_FRACTION` (Pillow, a
   matplotlib dependency, decodes the PNG),
6. optionally evaluates extra JavaScript expressions (``scripts``) after load, e.g. to click a
   table header and read the new row order, and returns their JSON values.

The binary is found from ``$CG3D_CHROMIUM``, then ``/usr/lib/chromium/chromium`` (the real binary
behind Debian's wrapper script), then ``chromium``, ``chromium-browser``, ``google-chrome`` on PATH.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--no-default-browser-check",
)

#: A screenshot is blank when fewer pixels than this share differ from its most common colour
#: (a one-word heading on an empty 1280 x 2000 page is about 0.03 %).
BLANK_FRACTION = 0.0001

_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:")

_BROKEN_IMAGES_JS = """JSON.stringify(Array.from(document.images)
  .filter(function (i) { return !i.complete || i.naturalWidth === 0; })
  .map(function (i) { return i.currentSrc || i.src || i.outerHTML.slice(0, 120); }))"""

_EAGER_IMAGES_JS = """(function () { var n = 0; Array.from(document.images).forEach(function (i) {
  if (i.loading === 'lazy') { i.loading = 'eager'; n++; } }); return n; })()"""

_PENDING_IMAGES_JS = "Array.from(document.images).filter(function (i) { return !i.complete; }).length"


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer."""


@dataclass
class BrowserCheck:
    """Outcome of :func:`check_report`; ``ok`` is true when nothing is wrong."""

    html_path: Path
    url: str
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    n_images: int = 0
    screenshot_path: Path | None = None
    screenshot_blank: bool = True
    screenshot_std: float = 0.0
    screenshot_nonbackground: float = 0.0     #: share of pixels that differ from the background
    scripts: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.console_errors or self.broken_images or self.external_requests
                    or self.screenshot_blank)

    def summary(self) -> str:
        parts = [f"{self.html_path}: {'OK' if self.ok else 'PROBLEMS'} ({self.elapsed_s:.1f} s,"
                 f" {self.n_images} images)"]
        parts += [f"  console error: {e}" for e in self.console_errors]
        parts += [f"  broken image: {e}" for e in self.broken_images]
        parts += [f"  external request: {e}" for e in self.external_requests]
        if self.screenshot_blank:
            parts.append(f"  blank screenshot (std {self.screenshot_std:.2f}, "
                         f"non-background {self.screenshot_nonbackground:.4f})")
        return "\n".join(parts)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    env = os.environ.get("CG3D_CHROMIUM")
    if env:
        return shutil.which(env)      # an executable file (path or name on PATH), else None
    for candidate in ("/usr/lib/chromium/chromium",):
        if os.access(candidate, os.X_OK):
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """Minimal CDP client over Chromium's ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, profile: Path, extra_flags: tuple[str, ...] = ()):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # move the child's ends above 9 so that the shell can dup them onto 3 and 4 without clashes
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        args = [binary, *CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "about:blank"]
        self._log = tempfile.TemporaryFile()
        script = f'exec "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-'
        try:
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", script, "chromium", *args], pass_fds=(child_in, child_out),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                start_new_session=True,
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self._w = to_chrome_w
        self._r = from_chrome_r
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-n:]
        except (OSError, ValueError):
            return ""

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._r], [], [], remaining)
            if not ready:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe:\n" + self.stderr_tail())
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 20.0) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Read events until ``predicate(event)`` is true for one of them (already received included)."""
        if any(predicate(e) for e in self.events):
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._recv(deadline)
            except TimeoutError:
                return False
            self.events.append(event)
            if predicate(event):
                return True

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        self.wait_for(lambda e: False, seconds)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close", timeout=5)
                except (BrowserError, TimeoutError, OSError):
                    pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        finally:
            for fd in (self._w, self._r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()


def _console_text(params: dict[str, Any]) -> str:
    args = params.get("args", [])
    text = " ".join(str(a.get("value", a.get("description", a.get("type", "")))) for a in args)
    frames = (params.get("stackTrace") or {}).get("callFrames") or []
    where = f" ({frames[0].get('url')}:{frames[0].get('lineNumber', 0) + 1})" if frames else ""
    return f"console.{params.get('type')}: {text}{where}"


def _exception_text(params: dict[str, Any]) -> str:
    details = params.get("exceptionDetails", {})
    exc = details.get("exception") or {}
    text = exc.get("description") or details.get("text", "exception")
    return f"uncaught exception: {text} ({details.get('url', '')}:{details.get('lineNumber', 0) + 1})"


def screenshot_stats(png: bytes) -> tuple[float, float]:
    """(pixel standard deviation, share of pixels differing from the most common colour) of a PNG."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    flat = img.reshape(-1, 3)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    mode = int(colours[int(np.argmax(counts))])
    background = np.array([(mode >> 16) & 255, (mode >> 8) & 255, mode & 255])
    differs = np.any(np.abs(flat - background) > 8, axis=1)
    return float(img.std()), float(differs.mean())


def check_report(
    html_path: str | os.PathLike,
    *,
    screenshot: str | os.PathLike | None = None,
    window_size: tuple[int, int] = (1280, 2000),
    full_page: bool = False,
    timeout: float = 30.0,
    scripts: dict[str, str] | None = None,
    chromium: str | None = None,
) -> BrowserCheck:
    """Open ``html_path`` (``file://``) in headless Chromium and check it; see the module docstring.

    ``screenshot``: where to keep the PNG (default: a temporary file, deleted). ``full_page``: capture
    the whole page instead of the ``window_size`` viewport. ``scripts``: ``{name: JS expression}``
    evaluated after load; results (JSON-serialisable values) land in :attr:`BrowserCheck.scripts`.
    Raises :class:`BrowserError` when Chromium is missing or fails, ``FileNotFoundError`` for a
    missing report.
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    binary = chromium or find_chromium()
    if binary is None:
        raise BrowserError("chromium not found: apt-get install chromium (or set CG3D_CHROMIUM)")
    url = html_path.as_uri()
    check = BrowserCheck(html_path=html_path, url=url)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cg3d-chromium-") as tmp:
        pipe = _Pipe(binary, Path(tmp) / "profile")
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Page.setLifecycleEventsEnabled", {"enabled": True}, session=session)
            width, height = window_size
            pipe.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                      session=session)
            pipe.events.clear()
            pipe.call("Page.navigate", {"url": url}, session=session)
            if not pipe.wait_for(lambda e: e.get("method") == "Page.loadEventFired", timeout):
                raise BrowserError(f"{url} did not finish loading within {timeout:.0f} s")
            # lazy images below the fold: load them all, then wait for the network to settle
            pipe.call("Runtime.evaluate", {"expression": _EAGER_IMAGES_JS, "returnByValue": True},
                      session=session)
            deadline = time.monotonic() + min(timeout, 15.0)
            while time.monotonic() < deadline:
                pending = pipe.call("Runtime.evaluate", {"expression": _PENDING_IMAGES_JS,
                                                         "returnByValue": True}, session=session)
                if not pending.get("result", {}).get("value"):
                    break
                pipe.pump(0.1)
            pipe.pump(0.2)  # late console messages / failed loads
            value = pipe.call("Runtime.evaluate", {"expression": _BROKEN_IMAGES_JS, "returnByValue": True},
                              session=session)
            check.broken_images = json.loads(value.get("result", {}).get("value") or "[]")
            info = pipe.call("Runtime.evaluate", {"expression": "JSON.stringify([document.title, "
                                                  "document.images.length])", "returnByValue": True},
                             session=session)
            check.title, check.n_images = json.loads(info["result"]["value"])
            for name, expression in (scripts or {}).items():
                res = pipe.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True}, session=session)
                if "exceptionDetails" in res:
                    check.scripts[name] = {"error": _exception_text(res)}
                else:
                    check.scripts[name] = res.get("result", {}).get("value")
            params: dict[str, Any] = {"format": "png"}
            if full_page:
                metrics = pipe.call("Page.getLayoutMetrics", session=session)
                size = metrics.get("cssContentSize") or metrics.get("contentSize")
                params.update(captureBeyondViewport=True, clip={
                    "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
            png = base64.b64decode(pipe.call("Page.captureScreenshot", params, session=session,
                                             timeout=timeout)["data"])
        except TimeoutError as exc:
            raise BrowserError(f"Chromium timed out on {url}: {exc}\n{pipe.stderr_tail()}") from exc
        finally:
            pipe.close()
        for event in pipe.events:
            method, params_ = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params_.get("type") in ("error", "assert"):
                check.console_errors.append(_console_text(params_))
            elif method == "Runtime.exceptionThrown":
                check.console_errors.append(_exception_text(params_))
            elif method == "Log.entryAdded" and params_.get("entry", {}).get("level") == "error":
                entry = params_["entry"]
                text = f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}"
                check.console_errors.append(text.strip())
            elif method == "Network.requestWillBeSent":
                req_url = params_.get("request", {}).get("url", "")
                if not req_url.startswith(_LOCAL_SCHEMES):
                    check.external_requests.append(req_url)
    check.screenshot_std, check.screenshot_nonbackground = screenshot_stats(png)
    check.screenshot_blank = check.screenshot_nonbackground < BLANK_FRACTION
    if screenshot is not None:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot).write_bytes(png)
        check.screenshot_path = Path(screenshot)
    check.elapsed_s = time.monotonic() - t0
    return check


def main(argv: list[str] | None = None) -> int:
    """``python tests/browser.py REPORT.html [--screenshot out.png] [--full-page]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="+", type=Path)
    parser.add_argument("--screenshot", type=Path, help="PNG to write (only with one report)")
    parser.add_argument("--full-page", action="store_true")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    status = 0
    for path in args.html:
        result = check_report(path, screenshot=args.screenshot if len(args.html) == 1 else None,
                              full_page=args.full_page, window_size=(args.width, args.height))
        print(result.summary())
        status |= 0 if result.ok else 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
