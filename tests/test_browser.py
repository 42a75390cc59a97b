"""A real browser talks to `diffvoice serve`: headless Chromium with a WAV file as its microphone,
driven over the Chrome DevTools Protocol. The page's `window.diffvoice` counters are the probe;
a screenshot is saved under artifacts/."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import real_parts
import websockets
from speech_samples import spoken

from agent.serve import BrowserServer
from audio.codecs import write_wav

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
QUESTION = "What is the weather like today?"
LEAD_IN_S = 2.5  # silence before the question: the page connects meanwhile

# fixtures with the real models, shared by the modules that need them
real_settings = real_parts.real_settings
real_models = real_parts.real_models

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


def _microphone_wav(folder: Path) -> Path:
    rate = 48000
    lead = np.zeros(int(LEAD_IN_S * rate), dtype=np.int16)
    tail = np.zeros(6 * rate, dtype=np.int16)
    path = folder / "question.wav"
    write_wav(path, np.concatenate([lead, spoken(QUESTION, rate=rate), tail]), rate)
    return path


def _launch(url: str, wav: Path, profile: Path) -> subprocess.Popen:
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}",
        "--remote-debugging-port=0", "--window-size=1000,900", url,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _page_socket(profile: Path) -> str:
    """The page's DevTools WebSocket URL, once Chromium has written its port."""
    port_file = profile / "DevToolsActivePort"
    for _ in range(200):
        if port_file.exists() and port_file.read_text().strip():
            port = port_file.read_text().split()[0]
            targets = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/json/list")
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        await asyncio.sleep(0.1)
    raise TimeoutError("Chromium did not open its DevTools port")


def _get_json(url: str) -> list[dict]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class DevTools:
    """Just enough of the DevTools Protocol: one command at a time, events ignored."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def state(self) -> dict:
        result = await self.call("Runtime.evaluate", returnByValue=True,
                                 expression="JSON.stringify(window.diffvoice || null)")
        return json.loads(result["result"].get("value") or "null") or {}


def _done(s: dict) -> bool:
    audio = s.get("audio", {})
    return bool(s.get("userFinals") and s.get("turns") and audio.get("totalAudioEnergy", 0) > 0
                and s.get("heardLatencies"))


@pytest.mark.slow
async def test_chromium_talks_with_the_agent(real_settings, real_models, tmp_path):
    settings = real_settings.model_copy(deep=True)
    settings.session.greeting = ""  # the first agent audio must answer the question
    settings.server.max_sessions = 1  # a second tab is turned away
    server = BrowserServer(settings, real_models)
    await server.start()
    url = f"http://127.0.0.1:{server.signalling.port}/?autoconnect"
    browser = _launch(url, _microphone_wav(tmp_path), tmp_path / "profile")
    state: dict = {}
    busy: dict = {}
    try:
        page = await _page_socket(tmp_path / "profile")
        async with websockets.connect(page, max_size=None) as ws:
            devtools = DevTools(ws)
            deadline = time.monotonic() + 60
            while not _done(state) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                state = await devtools.state()
            await asyncio.sleep(1.0)  # let the reply text and chart render for the screenshot
            shot = await devtools.call("Page.captureScreenshot", format="png")
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "browser-turn.png").write_bytes(base64.b64decode(shot["data"]))
            busy = await _second_tab(devtools, page, url)
    finally:
        browser.terminate()
        await asyncio.to_thread(browser.wait, 10)
        await server.close()
    assert not state.get("errors"), state.get("errors")
    assert any("weather" in t.lower() for t in state["userFinals"]), state
    assert state["agentTexts"], "the agent's committed reply text never reached the page"
    assert state["audio"]["packetsReceived"] > 0 and state["audio"]["totalAudioEnergy"] > 0
    audio = state["audio"]
    if audio["jitterBufferEmittedCount"]:  # what `bench.caller_jitter_prefetch_frames` models
        logging.getLogger(__name__).info("Chromium's mean playout buffer: %.1f ms", (
            1000 * audio["jitterBufferDelay"] / audio["jitterBufferEmittedCount"]))
    # the page measured the turn as a listener would: its last sound to the agent's first
    assert state["heardLatencies"] and state["heardLatencies"][0] > 0, state
    # the server's reason stays on screen (not a generic "closed") and the page can retry
    assert busy["errors"] == ["server busy: too many conversations"], busy
    assert not busy["connected"] and busy["canConnect"], busy


async def _second_tab(devtools: DevTools, page_socket: str, url: str) -> dict:
    """Open the page in a second tab while the first holds the server's only place."""
    target = (await devtools.call("Target.createTarget", url=url))["targetId"]
    async with websockets.connect(page_socket.rsplit("/", 1)[0] + "/" + target) as ws:
        tab = DevTools(ws)
        state: dict = {}
        deadline = time.monotonic() + 20
        while not state.get("errors") and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            state = await tab.state()
        await asyncio.sleep(1.0)  # anything the page would do after the socket closes
        state = await tab.state()
        result = await tab.call("Runtime.evaluate", returnByValue=True,
                                expression="!document.getElementById('connect').disabled")
        return {**state, "canConnect": result["result"]["value"]}
