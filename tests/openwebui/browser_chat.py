"""Drive Open-WebUI's chat page in headless Chromium and take a screenshot.

Stdlib only: talks the Chrome DevTools Protocol over --remote-debugging-pipe
(fd 3 = commands in, fd 4 = replies out, NUL-separated JSON), so no
websocket library or Playwright browser download is needed. Needs Debian's
`chromium` (apt-get install chromium).

chat_and_screenshot() logs in by putting the API token in localStorage,
opens /?model=MODEL&q=PROMPT (Open-WebUI's own URL parameters that pick the
model and fill the input), clicks the send button, waits for the assistant
reply to render (it arrives over Open-WebUI's socket.io path, unlike the
plain REST checks), and saves a PNG.
"""
import base64
import json
import os
import select
import signal
import subprocess
import time
import urllib.parse


class CDP:
    def __init__(self, chromium, work, width=1280, height=900):
        self.r_cmd, self.w_cmd = os.pipe()  # we write commands -> chrome fd 3
        self.r_out, self.w_out = os.pipe()  # chrome fd 4 -> we read
        prof = os.path.join(work, "chromium-profile")
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 "--disable-background-networking", "--disable-sync", "--mute-audio",
                 "--user-data-dir=" + prof, "--window-size=%d,%d" % (width, height),
                 "--remote-debugging-pipe", "about:blank"]
        cmd = 'exec "$0" "$@" 3<&%d 4>&%d' % (self.r_cmd, self.w_out)
        self.log = open(os.path.join(work, "chromium.log"), "wb")
        self.proc = subprocess.Popen(["bash", "-c", cmd, chromium] + flags,
                                     pass_fds=(self.r_cmd, self.w_out), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        os.close(self.r_cmd)
        os.close(self.w_out)
        self.buf = b""
        self.next_id = 0
        self.session = None
        self.events = []

    def _read_msg(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no CDP reply")
            r, _, _ = select.select([self.r_out], [], [], min(left, 1.0))
            if r:
                data = os.read(self.r_out, 1 << 20)
                if not data:
                    raise EOFError("chromium closed the debugging pipe (see chromium.log)")
                self.buf += data
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, timeout=30, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.w_cmd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_msg(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError("%s: %s" % (method, m["error"]))
                return m.get("result", {})
            self.events.append(m)

    def js(self, expr, timeout=30):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True,
                                           "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in r:
            raise RuntimeError("JS error: %s" % json.dumps(r["exceptionDetails"])[:300])
        return r.get("result", {}).get("value")

    def wait_js(self, expr, timeout, poll=0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(poll)
        return None

    def close(self):
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # only the group we started
            self.proc.wait(5)
        for fd in (self.w_cmd, self.r_out):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


DISMISS_JS = r"""(() => {  // "What's New" changelog modal shown to a new admin
  const b = [...document.querySelectorAll('button')].find(b => /^Okay, Let/.test(b.innerText.trim()));
  if (b) b.click();
  return !!b;
})()"""

DONE_JS = r"""(() => {
  const vis = sel => [...document.querySelectorAll(sel)].some(b => b.offsetParent !== null);
  return !vis('button[aria-label="Stop"]') && vis('button[aria-label="Regenerate"]');
})()"""

REPLY_JS = r"""(() => {
  const els = [...document.querySelectorAll('#response-content-container')];
  const t = els.map(e => e.innerText.trim()).filter(Boolean);
  return t.length ? t[t.length - 1] : '';
})()"""


def chat_and_screenshot(chromium, url, token, model, prompt, png, expect=None, timeout=120, work="."):
    """Returns (ok, detail, reply): reply is the text the page shows for the answer (with
    Open-WebUI's "Thought for ..." label first when the reply had reasoning)."""
    t0 = time.monotonic()
    try:
        cdp = CDP(chromium, work)
    except OSError as e:
        return False, "cannot start %s: %s" % (chromium, e), ""
    try:
        tid = cdp.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        cdp.session = cdp.call("Target.attachToTarget", {"targetId": tid, "flatten": True},
                               session=False)["sessionId"]
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        # same-origin page first, so localStorage is the app's
        cdp.call("Page.navigate", {"url": url + "/manifest.json"})
        cdp.wait_js("document.readyState === 'complete'", 30)
        cdp.js("localStorage.setItem('token', %s); localStorage.setItem('locale', 'en-US'); true"
               % json.dumps(token))
        q = urllib.parse.urlencode({"model": model, "q": prompt})
        cdp.call("Page.navigate", {"url": url + "/?" + q})
        btn = cdp.wait_js("(() => { const b = document.getElementById('send-message-button');"
                          " return !!(b && !b.disabled); })()", 60)
        if not btn:
            shot(cdp, png)
            return False, "send button never enabled (page: %r)" % cdp.js(
                "document.body ? document.body.innerText.slice(0, 200) : ''"), ""
        # dismiss any modal (e.g. changelog) that could cover the page, then send
        time.sleep(1.0)
        cdp.js(DISMISS_JS)
        cdp.js("document.getElementById('send-message-button').click(); true")
        want = (lambda t: expect in t) if expect else (lambda t: bool(t.strip()))
        deadline = time.monotonic() + timeout
        reply = ""
        while time.monotonic() < deadline:
            reply = cdp.js(REPLY_JS) or ""
            # done: reply text present, the "Stop" button (shown while the reply
            # streams) gone and the reply's "Regenerate" action shown
            if want(reply) and cdp.js(DONE_JS):
                time.sleep(0.5)
                if (cdp.js(REPLY_JS) or "") == reply:
                    break
            time.sleep(0.3)
        cdp.js(DISMISS_JS)
        time.sleep(0.5)
        shot(cdp, png)
        ok = want(reply) and bool(cdp.js(DONE_JS))
        where = cdp.js("location.pathname")
        detail = "%.1fs, %s, reply %r" % (time.monotonic() - t0, where, reply[:120]) if ok else \
            "no finished reply after %ds, last text %r (see %s)" % (timeout, reply[:120], png)
        return ok, detail, reply
    except Exception as e:  # report, don't crash the harness
        try:
            shot(cdp, png)
        except Exception:
            pass
        return False, "%s: %s" % (type(e).__name__, e), ""
    finally:
        cdp.close()


def shot(cdp, png):
    data = cdp.call("Page.captureScreenshot", {"format": "png"})["data"]
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    with open(png, "wb") as f:
        f.write(base64.b64decode(data))
