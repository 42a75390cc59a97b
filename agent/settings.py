"""Settings of a diffvoice deployment, defined once.

Sources, highest priority first: CLI `--set section.key=value`, environment variables
`DIFFVOICE_SECTION__KEY=value`, a TOML file (`--config NAME` reads `configs/NAME.toml`, or a
path), then the defaults written in the section models below and in `llm/settings.py`,
`audio/settings.py`. Unknown keys are an error in every source.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from audio.settings import AsrSettings, TtsSettings, VadSettings
from llm.settings import LLMSettings, apply_override

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "default"
# False while CLI overrides are validated: the environment is already merged in below them
_READ_ENV = contextvars.ContextVar("diffvoice_read_env", default=True)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionSettings(Section):
    """The AgentSession every transport shares: turn taking, interruptions, greeting."""

    # "text": the caller's words scored by `text_turn_model` (agent/turn_detector.py);
    # "v1-mini": LiveKit's offline end-of-turn model on the last 1.2 s of audio (in-process);
    # "vad" = silence only
    turn_detector: Literal["v1-mini", "text", "vad"] = "text"
    # the causal model the "text" detector asks whether the caller's words end the turn
    text_turn_model: str = "dv-small-ar"
    # score with the model folder's end-of-turn head where it has one (agent/turn_head.py:
    # fitted on complete and cut-off chit-chat replies); false: the model's p(end) itself
    text_turn_head: bool = True
    # end-of-turn probability under which the detector holds the turn open (up to the max delay
    # below); None = the model's calibrated value (v1-mini, English: 0.36; text: see
    # agent/turn_detector.py). Lower ends turns sooner after complete questions it scores low,
    # at the cost of cutting in on pauses
    turn_end_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    # the "text" detector's graded hold: words scored under turn_end_threshold wait for a
    # silence that rises from min_endpointing_delay_s at the threshold to
    # max_endpointing_delay_s at this floor, linearly in log p (agent/turn_detector.py), instead
    # of LiveKit's cliff from the minimum to the maximum at the threshold. 0 = the cliff; None =
    # the detector's calibrated floor (0.05 on p(end), or its end-of-turn head's)
    turn_hold_floor: float | None = Field(None, ge=0.0, lt=1.0)
    # the "text" detector learns each caller's pauses: when the caller speaks again right after
    # the agent took the turn (too soon to be answering it), their turns wait for that pause
    # plus learned_pause_margin_s from then on, easing back on each exchange in which the
    # caller answers the agent and renewed by each pause they resume from (agent/turn_detector.py,
    # `PauseMemory`)
    learn_pauses: bool = True
    learned_pause_margin_s: float = Field(0.25, ge=0.0)
    # silence after speech before the turn may end; LiveKit's streaming default is 0.3-2.5 s
    min_endpointing_delay_s: float = Field(0.3, ge=0.0)
    max_endpointing_delay_s: float = Field(2.5, ge=0.0)
    allow_interruptions: bool = True
    # speech the VAD must hear before the agent falls silent (paused, then stopped once words
    # come): the caller hears it stop ~0.46 s after they began at 0.3, ~0.64 s at LiveKit's 0.5
    # (docs/benchmarks.md, "Speaking over the agent"); a shorter noise never stops it
    min_interruption_duration_s: float = Field(0.3, ge=0.0)
    # a listener's murmurs: said alone while the agent speaks (up to four words of them, case
    # and punctuation aside) they neither stop it nor get an answer; a reply the VAD paused for
    # one resumes after false_interruption_timeout_s. Whisper tiny.en hears a spoken "uh-huh"
    # as "Oh." or "Wow.". Empty: any words interrupt
    backchannels: list[str] = [
        "uh-huh", "mm-hmm", "mhm", "mm", "hmm", "uh", "um", "oh", "ah", "wow", "yeah", "yep",
        "yes", "okay", "ok", "right", "sure", "alright", "i see", "got it", "cool", "nice",
    ]
    resume_false_interruption: bool = True
    # an interruption followed by this much silence without words is false: resume speaking.
    # The recognizer's final transcript comes within ~0.2 s of the VAD's end of speech (three
    # callers on two cores included), so a reply paused for a murmur resumes ~0.85 s after it
    # went silent (LiveKit's default, 2 s, is sized for cloud recognizers: docs/benchmarks.md,
    # "Speaking over the agent")
    false_interruption_timeout_s: float = Field(0.5, gt=0.0)
    # start the reply on the preflight/final transcript before the turn is confirmed
    preemptive_generation: bool = True
    # synthesise the preemptive reply's speech too (LiveKit's default: the LLM only), so its
    # first audio is ready when the turn is confirmed
    preemptive_tts: bool = True
    # reuse a preemptive draft when the confirmed request has the same context
    reuse_drafts: bool = True
    # spoken when a visitor connects; empty = wait for the user
    greeting: str = "Hi! How can I help?"
    user_away_timeout_s: float | None = Field(15.0, gt=0.0)
    # barge-in is ignored this long after the agent starts speaking, while the client's echo
    # canceller adapts (LiveKit's default is 3 s; browsers' AEC settles well within 1 s)
    aec_warmup_s: float = Field(1.0, ge=0.0)


class ServerSettings(Section):
    """`diffvoice serve`: the browser page, signalling and WebRTC peers."""

    host: str = "127.0.0.1"  # loopback; any other address requires access_token
    port: int = Field(8080, ge=0, le=65535)  # 0 = any free port
    # required in the signalling URL (`/ws?token=...`) when host is not loopback
    access_token: str = ""
    # extra Origins allowed to open the signalling socket; the page's own origin always is
    allowed_origins: list[str] = []
    max_sessions: int = Field(4, ge=1)  # each holds STT, TTS and a share of the engine batch
    max_message_bytes: int = Field(64 * 1024, ge=1024)  # an SDP offer is 2-8 KiB
    ice_timeout_s: float = Field(15.0, gt=0.0)  # a peer not connected by then is dropped
    # the microphone's packets held for reordering before decoding: each one adds 20 ms before
    # the agent hears the caller (aiortc's default holds 4; loss is concealed by Opus anyway)
    jitter_prefetch_frames: int = Field(1, ge=1, le=8)
    # WebRTC audio is 48 kHz both ways; the agent's speech stages run at 16 kHz
    input_sample_rate: int = 16000
    metrics_log: str = "logs/turns.jsonl"  # per-turn latency records; empty = off


class PhoneSettings(Section):
    """`diffvoice phone`: the Twilio Media Streams WebSocket server."""

    host: str = "127.0.0.1"  # loopback: a TLS reverse proxy in front serves the provider's wss://
    port: int = Field(8765, ge=0, le=65535)  # 0 = any free port
    # when set, the stream's custom parameter `secret_parameter` must equal it (TwiML
    # <Parameter name="token" value="..."/>); calls without it are refused
    shared_secret: str = ""
    secret_parameter: str = "token"
    max_calls: int = Field(8, ge=1)  # each holds a session; the engine batches their replies
    # sockets not yet past `start` (anyone can open one; the secret is checked at `start`):
    # they hold no session, so they are capped apart from the calls and far higher, and idle
    # sockets cannot take the calls' places
    max_unstarted: int = Field(32, ge=1)
    # a media frame is ~250 bytes of JSON and `start` ~1 KiB; anything far larger is hostile
    max_message_bytes: int = Field(16 * 1024, ge=1024)
    # the provider streams 50 frames/s; frames past this sustained rate are dropped (a flood or
    # a replay); short catch-up bursts pass
    max_media_frames_per_s: int = Field(150, ge=50)
    # malformed messages tolerated before the call is ended as a broken peer
    max_bad_messages: int = Field(200, ge=1)
    start_timeout_s: float = Field(10.0, gt=0.0)  # a socket that never sends `start` is closed
    # no media for this long (the provider streams even silence) = a vanished caller
    media_timeout_s: float = Field(20.0, gt=0.0)
    # an unechoed mark: after this long past its expected playout, fall back to the send clock
    mark_timeout_s: float = Field(3.0, gt=0.0)
    # keypad digits collected until '#' or this much quiet, then sent as one user message
    dtmf_gap_s: float = Field(1.5, gt=0.0)
    dtmf_text: str = "I pressed {digits} on the keypad."
    # phone audio is 8 kHz; the agent's speech stages run at 16 kHz
    input_sample_rate: int = 16000
    metrics_log: str = "logs/calls.jsonl"  # per-call and per-turn records; empty = off
    # `diffvoice livekit`: "" = dispatched to every new room; a name = only rooms that request
    # it (explicit dispatch, e.g. from a SIP dispatch rule's agents list)
    livekit_agent_name: str = ""


# a simulated microphone's noise floor above this (dBFS RMS) drowns the speech it carries
MAX_NOISE_FLOOR_DBFS = -20.0


class BenchSettings(Section):
    """`diffvoice bench`: end-to-end turn latency measured at the client."""

    # webrtc: an aiortc peer through `diffvoice serve`'s signalling (what a browser does);
    # twilio: a simulated caller on `diffvoice phone`'s Media Streams socket (timed at playout);
    # inprocess: the session on our own audio I/O, no transport (isolates the pipeline)
    transport: Literal["webrtc", "twilio", "inprocess"] = "webrtc"
    turns: int = Field(0, ge=0)  # spoken turns per session; 0 = the whole input set
    # the built-in set is spoken as conversations of this many turns (history carries inside one)
    turns_per_conversation: int = Field(4, ge=1)
    # int16 level of the first "audible" agent sample: about -36 dBFS, above Opus's noise floor
    # and Piper's leading near-silence
    audible_level: int = Field(500, ge=1, le=32767)
    # no audible reply this long after the user's last sample = a dropped turn
    reply_timeout_s: float = Field(30.0, gt=0.0)
    # an audible reply's metrics come once it has finished playing (replies run up to ~10 s;
    # longer on a saturated CPU); none by then = a dropped turn
    metrics_timeout_s: float = Field(60.0, gt=0.0)
    # quiet (no agent audio, agent listening) before the next turn is spoken
    settle_s: float = Field(0.6, ge=0.0)
    # on a running server (--url): how long a new conversation waits for a greeting to be
    # heard before its first turn (a greeting plays once synthesised, and the agent's state
    # says nothing before; a server that does not greet costs this once per conversation)
    greeting_timeout_s: float = Field(5.0, ge=0.0)
    # the simulated caller's microphone noise floor (dBFS RMS, white, under speech and pauses);
    # None: digital silence between words, which no real microphone sends. The end-of-turn
    # model hears the difference (docs/benchmarks.md, "End-of-turn threshold")
    noise_floor_dbfs: float | None = Field(None, le=MAX_NOISE_FLOOR_DBFS)
    # lengthen the longest pause inside each spoken turn (between two words) to this many ms: a
    # caller hesitating mid-sentence. An agent heard before the turn's last word is a cut-in
    # (status "cut_in"), the price of a shorter turn decision. None: the turns as spoken
    pause_ms: int | None = Field(None, ge=20, le=5000)
    # say `barge_in_text` over each reply, its first word this many ms after the reply became
    # audible, and measure how soon the caller hears the agent stop (`barge_in` in bench.json:
    # stopped, paused and resumed, talked over, or ended before it was stopped). Under ~0.5 s
    # the session may take the caller for one who paused and went on (a learned pause). None:
    # let every reply finish
    barge_in_ms: int | None = Field(None, ge=0, le=10000)
    # what the caller says over the reply: an interruption, or a backchannel ("Uh-huh.") that
    # should not stop it
    barge_in_text: str = Field("Sorry, wait, can I ask you something else?", min_length=1)
    # the WebRTC caller's receive jitter buffer: packets held before the agent's speech plays
    # (20 ms each). aiortc's default is 4, close to headless Chromium's own adaptive buffer on a
    # 2-core machine (45-111 ms mean over four runs: docs/benchmarks.md, "End-to-end turn
    # latency")
    caller_jitter_prefetch_frames: int = Field(4, ge=1, le=8)
    # with --sessions N, caller s starts s times this many seconds after the first, so callers'
    # turns interleave as independent callers' would; 0: all start together and, saying the same
    # turns, collide on every one (the worst case)
    stagger_s: float = Field(0.0, ge=0.0, le=60.0)
    # the self-started WebRTC server runs in a process of its own, as a deployed one does; false:
    # in the bench's process, where the simulated caller's Python work (Opus, RTP, its
    # microphone) holds the GIL the server's event loop and engine wait for (docs/benchmarks.md)
    server_process: bool = True
    cache_dir: str = ".cache/bench-speech"  # synthesised built-in turns, one WAV each
    out_dir: str = "runs/bench"  # bench.json, bench.png, bench.html


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DIFFVOICE_", env_nested_delimiter="__", extra="forbid"
    )
    log_level: str = "INFO"
    llm: LLMSettings = LLMSettings()
    asr: AsrSettings = AsrSettings()
    tts: TtsSettings = TtsSettings()
    vad: VadSettings = VadSettings()
    session: SessionSettings = SessionSettings()
    server: ServerSettings = ServerSettings()
    phone: PhoneSettings = PhoneSettings()
    bench: BenchSettings = BenchSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init_settings carries the CLI overrides merged over the TOML file (see load_settings),
        # so the environment must come first to win over the file
        return (env_settings, init_settings) if _READ_ENV.get() else (init_settings,)


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        path = p
    else:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(f.stem for f in CONFIG_DIR.glob("*.toml"))
        raise FileNotFoundError(f"config {name_or_path!r} not found (named configs: {known})")
    return path


def _check_env() -> None:
    """pydantic-settings ignores unknown prefixed variables; a typo must not pass silently."""
    prefix = Settings.model_config["env_prefix"]
    for name in os.environ:
        if name.upper().startswith(prefix):
            field = name[len(prefix):].split("__")[0].lower()
            if field not in Settings.model_fields:
                raise ValueError(f"unknown setting in environment variable {name}")


def read_config(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict:
    """A config's TOML as a dict, laid over the config its `base` key names, if any: a variant
    states only what it changes (`base = "default"`)."""
    path = resolve_config_path(name_or_path).resolve()
    if path in _seen:
        raise ValueError(f"config {name_or_path!r} is its own base ({path})")
    data = tomllib.loads(path.read_text())
    parent = data.pop("base", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ValueError(f"{path}: base must be a config name or path, not {parent!r}")
    return _laid_over(read_config(parent, (*_seen, path)), data)


def _laid_over(below: dict, above: dict) -> dict:
    """Tables merge key by key; any other value in `above` replaces the one below."""
    out = dict(below)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _laid_over(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(config: str | None = None, overrides: list[str] | None = None) -> Settings:
    """Settings from a named config or TOML path, the environment and `key=value` overrides.

    Environment variables override the TOML file; CLI overrides win over both.
    """
    _check_env()
    data = read_config(config or DEFAULT_CONFIG)
    base = Settings(**data)  # file + environment
    merged = base.model_dump()
    for item in overrides or []:
        apply_override(merged, item)
    if not overrides:
        return base
    token = _READ_ENV.set(False)  # re-reading the environment would let it beat the overrides
    try:
        return Settings.model_validate(merged)
    finally:
        _READ_ENV.reset(token)
