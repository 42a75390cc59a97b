"""Per-turn events of one conversation, for the client and for a JSON-lines log.

    AgentSession events --> TurnReporter --send(dict)--> data channel / socket (the page)
                                         \\-> JSONL log (numbers only, never text)

Event dicts sent to the client (all have "type"):
- `user_transcript`: {"text", "final": bool} — the user's interim and final transcripts
- `agent_text`: {"text"} — reply text as the LLM commits it; `agent_text_end` closes a reply
- `agent_state`: {"state"} — listening / thinking / speaking
- `turn_metrics`: LiveKit's per-turn latencies in seconds: `end_of_utterance_delay_s`,
  `transcription_delay_s`, `llm_ttft_s`, `tts_ttfb_s`, `e2e_latency_s`; the server's Unix times
  of the VAD's end of speech (`user_stopped_speaking_at`) and of the reply's playback start as
  the audio output reports it (`agent_started_speaking_at`), between which `e2e_latency_s` runs;
  `reply_gaps_s`, the silence played inside the reply because its audio ran out before its end
  (transports with a paced output: WebRTC, in-process); plus `turn` and `interrupted`. With a
  paced output a reply that went silent before its end (paused for a possible interruption, or
  cut) adds `reply_stopped_at`, when the output stopped playing it, and `overlap_speech_at`,
  when the VAD last reported the user speaking over it before that. Absent keys were not
  measured for that turn.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from livekit.agents import AgentSession, llm
from livekit.agents.voice import io

from agent.audio_io import PacedAudioOutput

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], None]

# LiveKit's MetricsReport keys -> the names the page and the log use
_USER_METRICS = {
    "end_of_turn_delay": "end_of_utterance_delay_s",
    "transcription_delay": "transcription_delay_s",
    "stopped_speaking_at": "user_stopped_speaking_at",
}
_AGENT_METRICS = {
    "llm_node_ttft": "llm_ttft_s",
    "tts_node_ttfb": "tts_ttfb_s",
    "e2e_latency": "e2e_latency_s",
    "started_speaking_at": "agent_started_speaking_at",
}


class TurnReporter:
    """Turns one session's events into client events and logged per-turn metrics."""

    def __init__(self, session_id: str, send: Send, log_path: str | Path | None = None, *,
                 audio_out: PacedAudioOutput | None = None) -> None:
        self.session_id = session_id
        self.send = send
        self.log_path = Path(log_path) if log_path else None
        self.audio_out = audio_out  # the reply's gaps are read off it
        self.turns: list[dict[str, Any]] = []
        self._pending_user: dict[str, Any] = {}
        self._speech_at: float | None = None  # the VAD's last report of the user speaking

    def attach(self, session: AgentSession) -> None:
        session.on("user_input_transcribed", self._on_transcript)
        session.on("conversation_item_added", self._on_item)
        session.on("agent_state_changed", self._on_agent_state)
        session.on("user_state_changed", self._on_user_state)

    def _on_transcript(self, ev: Any) -> None:
        self.send({"type": "user_transcript", "text": ev.transcript, "final": ev.is_final})

    def _on_agent_state(self, ev: Any) -> None:
        self.send({"type": "agent_state", "state": ev.new_state})

    def _on_user_state(self, ev: Any) -> None:
        if ev.new_state == "speaking":  # when the VAD reports it (the event is backdated to
            self._speech_at = time.time()  # where the speech began)

    def _on_item(self, ev: Any) -> None:
        item = ev.item
        if not isinstance(item, llm.ChatMessage):
            return  # handoffs and tool items carry no turn metrics
        metrics = dict(item.metrics or {})
        if item.role == "user":
            self._pending_user = _pick(metrics, _USER_METRICS)
        elif item.role == "assistant":
            self._record(_pick(metrics, _AGENT_METRICS), interrupted=item.interrupted)

    def _record(self, agent_metrics: dict[str, float], *, interrupted: bool) -> None:
        turn = {"turn": len(self.turns) + 1, **self._pending_user, **agent_metrics}
        if self.audio_out is not None:  # the reply has finished playing when its item is added
            turn["reply_gaps_s"] = self.audio_out.last_reply_dry_s
            turn.update(self._overlap(self.audio_out.last_reply_stopped_at,
                                      agent_metrics.get("agent_started_speaking_at")))
        turn["interrupted"] = interrupted
        self._pending_user = {}
        self.turns.append(turn)
        self.send({"type": "turn_metrics", **turn})
        logger.info("turn %d latency: %s", turn["turn"], _fmt(turn))
        self._append_log(turn)

    def _overlap(self, stopped: float | None, started: float | None) -> dict[str, float]:
        """When a reply that went silent before its end stopped, and when the VAD last
        reported the user speaking while it played, before that."""
        if stopped is None:
            return {}
        out = {"reply_stopped_at": stopped}
        spoke = self._speech_at
        if spoke is not None and spoke <= stopped and (started is None or spoke >= started):
            out["overlap_speech_at"] = spoke
        return out

    def _append_log(self, turn: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        record = {"t": time.time(), "session": self.session_id, **turn}
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            logger.warning("cannot write turn log %s: %s", self.log_path, e)


class ClientTextOutput(io.TextOutput):
    """The session's transcription sink: each reply delta goes to the client as LiveKit forwards
    it (committed text, ahead of the speech), then on to `next_in_chain` — typically a
    `TranscriptSynchronizer`'s text output, so history keeps only what was heard."""

    def __init__(
        self, send: Send, *, next_in_chain: io.TextOutput | None = None, label: str = "client-text"
    ) -> None:
        super().__init__(label=label, next_in_chain=next_in_chain)
        self.send = send

    async def capture_text(self, text: str) -> None:
        if text:
            self.send({"type": "agent_text", "text": text})
        if self.next_in_chain is not None:
            await self.next_in_chain.capture_text(text)

    def flush(self) -> None:
        self.send({"type": "agent_text_end"})
        if self.next_in_chain is not None:
            self.next_in_chain.flush()


def _pick(metrics: dict[str, Any], names: dict[str, str]) -> dict[str, float]:
    return {ours: float(metrics[lk]) for lk, ours in names.items() if metrics.get(lk) is not None}


def _fmt(turn: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in turn.items() if k.endswith("_s"))
