// diffvoice page: microphone -> WebRTC peer -> agent; transcripts and turn metrics over a data
// channel. No build step. `window.diffvoice` exposes what happened, for people and for tests.
"use strict";

const $ = (id) => document.getElementById(id);
const ICE_GATHER_TIMEOUT_MS = 3000; // loopback host candidates gather in a few ms
const STATS_INTERVAL_MS = 250;
const CHART_TURNS = 12;
// client-side "heard" latency: last moment the microphone carried speech -> first audible agent
// sample, both seen by WebAudio analysers (levels are RMS of the float samples)
const LEVEL_POLL_MS = 10;
const MIC_SPEECH_RMS = 0.02;
const AGENT_AUDIBLE_RMS = 0.01;
const AGENT_QUIET_MS = 400; // agent audio after this much quiet starts a new reply
const MAX_TURN_GAP_MS = 20000; // speech longer ago than this was not the question

const state = {
  pc: null, ws: null, mic: null, statsTimer: null, agentLine: null,
  audioCtx: null, levelTimer: null, lastSpeechAt: 0, lastAgentAt: 0, serverSaid: null,
};
window.diffvoice = {
  connected: false, userFinals: [], userInterims: 0, agentTexts: [], turns: [], errors: [],
  heardLatencies: [],
  audio: { packetsReceived: 0, totalAudioEnergy: 0, audioLevel: 0 },
};

function setStatus(text) { $("status").textContent = text; }

function showMessage(text) {
  if (text) window.diffvoice.errors.push(text);
  const el = $("message");
  el.textContent = text;
  el.hidden = !text;
}

function setButtons(connected) {
  $("connect").disabled = connected;
  $("mute").disabled = !connected;
  $("hangup").disabled = !connected;
}

function addLine(who, text) {
  const line = document.createElement("div");
  line.className = `turn ${who}`;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who === "user" ? "You" : "Agent";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  line.append(name, body);
  $("log").append(line);
  line.scrollIntoView({ block: "end" });
  return body;
}

// ---- events from the agent (data channel) -------------------------------------------------
const handlers = {
  user_transcript(ev) {
    if (ev.final) {
      $("interim").textContent = "";
      if (ev.text.trim()) { addLine("user", ev.text); window.diffvoice.userFinals.push(ev.text); }
    } else {
      $("interim").textContent = ev.text;
      window.diffvoice.userInterims += 1;
    }
  },
  agent_text(ev) {
    if (!state.agentLine) state.agentLine = addLine("agent", "");
    state.agentLine.textContent += ev.text;
    window.diffvoice.agentTexts.push(ev.text);
  },
  agent_text_end() { state.agentLine = null; },
  agent_state(ev) { setStatus(`Connected — agent ${ev.state}`); },
  turn_metrics(ev) { window.diffvoice.turns.push(ev); addTurnRow(ev); drawChart(); },
  error(ev) { showMessage(ev.message); },
};

function onEvent(message) {
  let ev;
  try { ev = JSON.parse(message.data); } catch { return; }
  const handler = handlers[ev.type];
  if (handler) handler(ev);
}

// ---- latency table and chart --------------------------------------------------------------
const fmt = (v) => (typeof v === "number" ? v.toFixed(3) : "–");

function addTurnRow(t) {
  const row = document.createElement("tr");
  const cells = [t.turn + (t.interrupted ? " (cut)" : ""), fmt(t.end_of_utterance_delay_s),
    fmt(t.transcription_delay_s), fmt(t.llm_ttft_s), fmt(t.tts_ttfb_s), fmt(t.e2e_latency_s)];
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; row.append(td); }
  $("turns").querySelector("tbody").prepend(row);
}

function drawChart() {
  const svg = $("chart");
  const turns = window.diffvoice.turns.slice(-CHART_TURNS);
  const parts = (t) => [["eou", t.end_of_utterance_delay_s || 0], ["llm", t.llm_ttft_s || 0],
    ["tts", t.tts_ttfb_s || 0]];
  const total = (t) => Math.max(t.e2e_latency_s || 0, parts(t).reduce((a, [, v]) => a + v, 0));
  const maxS = Math.max(0.5, ...turns.map(total));
  const W = 400, H = 110, slot = W / CHART_TURNS, ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  turns.forEach((t, i) => {
    let y = H;
    for (const [cls, v] of parts(t)) {
      const h = (v / maxS) * (H - 10);
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("class", cls);
      r.setAttribute("x", i * slot + 4); r.setAttribute("width", slot - 8);
      r.setAttribute("y", y - h); r.setAttribute("height", h);
      svg.append(r);
      y -= h;
    }
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", i * slot + slot / 2); label.setAttribute("y", 118);
    label.setAttribute("text-anchor", "middle"); label.setAttribute("font-size", "8");
    label.textContent = fmt(total(t));
    svg.append(label);
  });
}

// ---- heard latency (measured here, in the page) -------------------------------------------
function analyser(stream) {
  const node = state.audioCtx.createAnalyser();
  node.fftSize = 512;
  state.audioCtx.createMediaStreamSource(stream).connect(node);
  return node;
}

function rms(node, buf) {
  node.getFloatTimeDomainData(buf);
  let sum = 0;
  for (const v of buf) sum += v * v;
  return Math.sqrt(sum / buf.length);
}

function watchLevels(mic, agentStream) {
  if (!window.AudioContext) return;
  state.audioCtx = state.audioCtx || new AudioContext();
  const micNode = analyser(mic), agentNode = analyser(agentStream);
  const buf = new Float32Array(micNode.fftSize);
  state.levelTimer = setInterval(() => {
    const now = performance.now();
    const agentAudible = rms(agentNode, buf) > AGENT_AUDIBLE_RMS;
    if (agentAudible) {
      const replyStart = now - state.lastAgentAt > AGENT_QUIET_MS;
      const gap = now - state.lastSpeechAt;
      if (replyStart && state.lastSpeechAt && gap < MAX_TURN_GAP_MS) recordHeard(gap / 1000);
      state.lastAgentAt = now;
    } else if (rms(micNode, buf) > MIC_SPEECH_RMS && now - state.lastAgentAt > AGENT_QUIET_MS) {
      state.lastSpeechAt = now; // the user, not the agent's echo
    }
  }, LEVEL_POLL_MS);
}

function recordHeard(seconds) {
  window.diffvoice.heardLatencies.push(seconds);
  state.lastSpeechAt = 0;
  const all = window.diffvoice.heardLatencies.slice().sort((a, b) => a - b);
  const p50 = all[Math.floor((all.length - 1) / 2)];
  $("heard").textContent = `Heard here: last ${seconds.toFixed(2)} s, median ${p50.toFixed(2)} s ` +
    `over ${all.length} repl${all.length === 1 ? "y" : "ies"} (your last sound to the agent's first)`;
}

// ---- connection ---------------------------------------------------------------------------
async function getMicrophone() {
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (e) {
    const denied = e && (e.name === "NotAllowedError" || e.name === "SecurityError");
    throw new Error(denied
      ? "Microphone access was denied. Allow it in the browser's site settings and connect again."
      : `No usable microphone (${e && e.name}).`);
  }
}

function openSignalling() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  const url = `${proto}//${location.host}/ws${token ? `?token=${encodeURIComponent(token)}` : ""}`;
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error("The diffvoice server is unreachable. Is `diffvoice serve` running?"));
  });
}

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHER_TIMEOUT_MS);
  });
}

function onSignal(message) {
  let msg;
  try { msg = JSON.parse(message.data); } catch { return; }
  if (msg.type === "answer" && state.pc) {
    state.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp }).catch((e) => {
      showMessage(`The server's answer was refused: ${e.message}`);
      hangUp();
    });
  } else if (msg.type === "error") {
    state.serverSaid = msg.message;
    showMessage(msg.message);
  }
}

function onSignallingClosed(ev) {
  if (!state.pc) return;
  // the server says why before it closes (busy, a refused offer, an ICE timeout): keep that
  if (!state.serverSaid) {
    showMessage(ev.reason ? `The server ended the conversation (${ev.reason}).`
      : "The server closed the connection.");
  }
  hangUp();
}

async function pollStats() {
  if (!state.pc) return;
  const report = await state.pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      window.diffvoice.audio = { packetsReceived: s.packetsReceived || 0,
        totalAudioEnergy: s.totalAudioEnergy || 0, audioLevel: s.audioLevel || 0,
        // the browser's own playout buffer: seconds summed over the samples it has played
        jitterBufferDelay: s.jitterBufferDelay || 0,
        jitterBufferEmittedCount: s.jitterBufferEmittedCount || 0 };
    }
  });
}

async function connect() {
  showMessage("");
  setStatus("Connecting…");
  $("connect").disabled = true;
  if (window.AudioContext && !state.audioCtx) state.audioCtx = new AudioContext(); // in the click
  try {
    state.mic = await getMicrophone();
    state.ws = await openSignalling();
  } catch (e) {
    hangUp();
    showMessage(e.message);
    return;
  }
  state.ws.onmessage = onSignal;
  state.ws.onclose = onSignallingClosed;
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pc = pc;
  try {
    await offer(pc);
  } catch (e) {
    if (state.pc !== pc) return; // hung up meanwhile: that said why
    hangUp();
    showMessage(`Could not connect: ${e.message}`);
  }
}

// the peer connection's offer; returns early when the call was hung up during a step
async function offer(pc) {
  for (const track of state.mic.getAudioTracks()) pc.addTrack(track, state.mic);
  const channel = pc.createDataChannel("events");
  channel.onmessage = onEvent;
  pc.ontrack = (ev) => {
    const stream = ev.streams[0] || new MediaStream([ev.track]);
    $("agent-audio").srcObject = stream;
    watchLevels(state.mic, stream);
  };
  pc.onconnectionstatechange = () => {
    const connected = pc.connectionState === "connected";
    window.diffvoice.connected = connected;
    if (connected) setStatus("Connected — say something");
    if (pc.connectionState === "failed") { showMessage("The audio connection failed."); hangUp(); }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc);
  if (state.pc !== pc) return;
  state.ws.send(JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }));
  state.statsTimer = setInterval(pollStats, STATS_INTERVAL_MS);
  setButtons(true);
}

function toggleMute() {
  if (!state.mic) return;
  const track = state.mic.getAudioTracks()[0];
  track.enabled = !track.enabled;
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
}

function hangUp() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "bye" }));
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  if (state.pc) state.pc.close();
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  clearInterval(state.statsTimer);
  clearInterval(state.levelTimer);
  Object.assign(state, { pc: null, ws: null, mic: null, statsTimer: null, agentLine: null,
    levelTimer: null, lastSpeechAt: 0, lastAgentAt: 0, serverSaid: null });
  window.diffvoice.connected = false;
  setButtons(false);
  $("mute").textContent = "Mute";
  setStatus("Not connected");
}

$("connect").addEventListener("click", connect);
$("mute").addEventListener("click", toggleMute);
$("hangup").addEventListener("click", hangUp);
if (new URLSearchParams(location.search).has("autoconnect")) connect();
