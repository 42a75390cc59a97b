"""End of turn from the words: a LiveKit turn detector scored by our own causal language model.

LiveKit's `v1-mini` model hears only the last 1.2 s of audio. On Piper-spoken turns over a
microphone's noise floor it let 91% of sentences cut off mid-way through at its threshold in
use (docs/benchmarks.md, "End-of-turn threshold"): a caller who pauses mid-sentence is answered
there. Words say more: "I went to the" is unfinished however it is spoken.

`TextTurnDetector` asks the shipped autoregressive model (`dv-small-ar`, trained on the same
chit-chat conversations as `dv-small`) how likely the caller's words end an utterance: the
conversation so far is rendered with the roles swapped, so the caller's words are the reply
the model was trained to score, its trailing punctuation (Whisper's guess) stripped, and

    p(end) = p(end-of-turn or eos | words) + sum over . ? ! of p(mark | words)

from one forward: the words either stop here or finish a sentence with their next token.
A model folder that holds an end-of-turn head (`agent.turn_head`, `diffvoice turn-head`)
scores with it instead: a logistic read-out of the same forward's logits, fitted on complete
and cut-off chit-chat replies, with its own threshold and floor.
Words scored below the threshold hold the turn open for a silence that grows the lower their
score, up to `session.max_endpointing_delay_s`, and a caller the agent answered in mid-sentence
is given the pause they took from then on (`SessionTurnDetector`, `PauseMemory`). It implements
LiveKit's text turn-detector protocol (`predict_end_of_turn` on the chat context, as its own
text end-of-utterance models do); scoring runs in one worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from llm.engine import cpu_has_int8
from llm.model import LayerKV, Transformer, pack_fp32, quantize_int8
from llm.tokenizer import ChatTokenizer
from llm.traced import TracedForwards, Variant, traceable

if TYPE_CHECKING:
    from agent.turn_head import EndOfTurnHead

log = logging.getLogger(__name__)

# p(end) under which the turn is held open: on 46 Piper-spoken turns and 184 cut-offs of them,
# transcribed by the deployment's Whisper, 0.15 holds 7% of the complete turns and lets 35-37%
# of the cut-off ones through, most of them complete sentences themselves ("It is raining
# outside"); v1-mini lets 64-91% through at 0.25 (docs/benchmarks.md, "End of turn from the
# words")
DEFAULT_THRESHOLD = 0.15
# p(end) at and under which the graded hold waits longest (`GradedHold`)
DEFAULT_FLOOR = 0.05
SENTENCE_MARKS = (".", "?", "!")
HISTORY_MESSAGES = 4  # earlier messages kept as context (LiveKit's text models keep 6 turns)
CACHED_SCORES = 32
CACHED_CONTEXTS = 8  # conversations whose context K/V are kept (~1 MB each)
# A caller who speaks again this soon after the agent's voice started cannot be answering it
# (~0.1 s for the reply to reach them, ~0.2 s to react, ~0.1 s before the VAD reports speech):
# they were pausing, and the agent took the turn too soon
REACTION_S = 0.4
# the longest silence learned from a caller's pauses: a longer one is a turn of its own (or the
# agent was slow to answer), and waiting longer after every turn costs more than a cut-in
LEARNED_PAUSE_CAP_S = 1.2
# each exchange in which the caller answers the agent keeps this share of the learned silence
# over the usual minimum
PAUSE_DECAY = 0.9
TRAILING = re.compile(r"[\s.?!,;:…]+$")  # Whisper's guess at the end, stripped before scoring
Message = dict[str, str]


class Scored(NamedTuple):
    """What one score reads: the conversation before the caller's words (rendered with the
    roles swapped, up to the reply prompt) and the words. Scores are keyed by it."""

    context: tuple[int, ...]
    words: tuple[int, ...]


def end_token_ids(tokenizer: ChatTokenizer) -> list[int]:
    """The tokens whose probabilities make p(end): the stop tokens and the sentence marks."""
    marks = [tokenizer.encode(m) for m in SENTENCE_MARKS]
    return sorted({*tokenizer.stop_ids, *(m[0] for m in marks if len(m) == 1)})


def end_probability(logits: Tensor, end_ids: list[int]) -> Tensor:
    """p(end) from next-token logits (..., vocab) -> (...)."""
    return torch.softmax(logits.float(), dim=-1)[..., end_ids].sum(-1)


class EndOfTurnScorer:
    """p(the last message ends its speaker's turn) from a causal LM and its tokenizer.

    The context's K/V are kept (a few conversations' worth): every interim, preflight and final
    transcript of a turn shares its context, so a score encodes only the caller's words (on a
    Zen 3 core, 8 words after 53 tokens of conversation: 14 ms instead of 39 ms). Words are
    always scored against a context encoded on its own, so a score never depends on which
    scores came before it."""

    def __init__(self, model: Transformer, tokenizer: ChatTokenizer,
                 head: EndOfTurnHead | None = None):
        if not model.cfg.causal:
            raise ValueError("the text turn detector needs a causal (autoregressive) model, "
                             "e.g. dv-small-ar")
        self.model, self.tok, self.head = model.eval(), tokenizer, head
        self.end_ids = end_token_ids(tokenizer)
        self.max_tokens = model.cfg.max_seq_len
        # context tokens -> their K/V per layer (the detector's scoring thread, or a caller's)
        self._contexts: collections.OrderedDict[tuple[int, ...], list[LayerKV]] = \
            collections.OrderedDict()
        self._contexts_lock = threading.Lock()
        self._traced = TracedForwards(model) if traceable(model) else None

    def p_end(self, messages: list[Message]) -> float:
        """messages: [{role: user|assistant, content}], the last one the speaker's words so far."""
        scored = self.scored(messages)
        return 1.0 if scored is None else self.p_end_scored(scored)

    def scored(self, messages: list[Message]) -> Scored | None:
        """The tokens scored for `messages` (None when the last one has no words)."""
        *history, last = messages[-(HISTORY_MESSAGES + 1):]
        words = self.tok.encode(TRAILING.sub("", last["content"].strip()))
        if not words:
            return None
        swap = {"user": "assistant", "assistant": "user"}
        context = [{"role": swap[m["role"]], "content": m["content"]} for m in history]
        context_ids = self.tok.encode_chat(context, add_generation_prompt=True)
        keep = max(0, self.max_tokens - len(words))
        return Scored(tuple(context_ids[-keep:] if keep else ()),
                      tuple(words[-self.max_tokens:]))

    def p_end_scored(self, scored: Scored) -> float:
        """Blocking: one forward over the words against the context's (kept) K/V."""
        with torch.inference_mode():
            words = torch.tensor([scored.words], device=self.device)
            logits, _ = self._last_logits(words, len(scored.context),
                                          self._context_kv(scored.context))
        p_end = float(end_probability(logits[0], self.end_ids))
        return p_end if self.head is None else self.head.p_complete(logits[0], p_end)

    def prepare(self) -> None:
        """Trace the scoring forwards (a context's encode, words after it) ahead of a turn."""
        if self._traced is not None and not self._traced.prepare(
                Variant.unmasked(True, False), Variant.unmasked(True, True)):
            self._traced = None

    def _last_logits(self, ids: Tensor, S: int,
                     context: list[LayerKV] | None) -> tuple[Tensor, list[LayerKV]]:
        """The logits (1, V) after the last of `ids` (1, T), at positions S.., and their K/V:
        one traced call on the CPU (`llm.traced`: the GIL is not held through its ops)."""
        T, dev = ids.shape[1], self.device
        pos = torch.arange(S, S + T, device=dev)[None]
        if self._traced is None:
            logits, kv = self.model(ids, pos, context=context, return_kv=True)
            return logits[:, -1], kv or []
        return self._traced(Variant.unmasked(True, context is not None), ids, pos,
                            torch.tensor([T - 1], device=dev), context)

    def _context_kv(self, context: tuple[int, ...]) -> list[LayerKV] | None:
        if not context:
            return None
        with self._contexts_lock:
            kv = self._contexts.get(context)
            if kv is None:
                _, kv = self._last_logits(torch.tensor([context], device=self.device), 0, None)
                self._contexts[context] = kv
                while len(self._contexts) > CACHED_CONTEXTS:
                    self._contexts.popitem(last=False)
            self._contexts.move_to_end(context)
            return kv

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class TextTurnDetector:
    """LiveKit's text turn-detector protocol (`livekit.agents.voice.turn._TurnDetector`)."""

    def __init__(self, scorer: EndOfTurnScorer, *, name: str, threshold: float | None = None):
        self.scorer, self._name = scorer, name
        head = scorer.head
        if threshold is None:
            threshold = DEFAULT_THRESHOLD if head is None else head.threshold
        self.threshold = threshold
        # the graded hold's floor where the session sets none (`session.turn_hold_floor`)
        self.floor = DEFAULT_FLOOR if head is None else head.floor
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn-detector")
        self._pool.submit(scorer.prepare)  # before the first score, off the loading thread
        # scores by the tokens scored: a transcript prefetched while the caller spoke is
        # answered at once when the session asks (the event loop's thread only)
        self._scores: collections.OrderedDict[Scored, Future[float]] = \
            collections.OrderedDict()
        # each caller's last prefetch (tokens, score): replaced by their next one while waiting
        self._prefetched: collections.OrderedDict[
            Hashable, tuple[Scored, Future[float]]] = collections.OrderedDict()

    @classmethod
    def load(cls, model: str, threshold: float | None = None,
             head: bool = True) -> TextTurnDetector:
        from agent.turn_head import EndOfTurnHead
        from llm.checkpoints import load_checkpoint, resolve_model_path

        loaded = load_checkpoint(resolve_model_path(model), device="cpu", dtype=torch.float32)
        # int8 projections where they are the fast choice, as the engine's (`cpu_has_int8`):
        # a score takes 6-11 ms on a Zen 4 core instead of 14-26 ms in fp32, and bench-turns
        # reads the same (AUC 0.84 / 0.85; at 0.15 one cut-off clip of 184 more let through
        # in digital silence); elsewhere fp32, its projections prepacked for oneDNN
        net = quantize_int8(loaded.model) if cpu_has_int8() else pack_fp32(loaded.model)
        fitted = EndOfTurnHead.load(loaded.path, loaded.model.cfg.vocab_size) if head else None
        scorer = EndOfTurnScorer(net, loaded.tokenizer, fitted)
        return cls(scorer, name=model, threshold=threshold)

    @property
    def model(self) -> str:
        return self._name

    @property
    def provider(self) -> str:
        return "diffvoice"

    async def unlikely_threshold(self, language: Any) -> float | None:
        return self.threshold

    async def supports_language(self, language: Any) -> bool:
        return language is None or str(language).lower().startswith("en")

    async def predict_end_of_turn(
        self, chat_ctx: Any, *, timeout: float | None = None  # noqa: ASYNC109 (the protocol's)
    ) -> float:
        messages = chat_messages(chat_ctx)
        if not messages or messages[-1]["role"] != "user":
            return 1.0
        scored = self.scorer.scored(messages)
        if scored is None:
            return 1.0
        ready = scored in self._scores and self._scores[scored].done()
        future = self._score(scored)
        for caller, (prefetched, _) in list(self._prefetched.items()):
            if prefetched == scored:  # asked for now: no later prefetch may cancel it
                del self._prefetched[caller]
        # shielded: LiveKit cancels this question when the caller makes a sound, and that must
        # not cancel the score other questions (another caller's same words) share
        p = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        log.debug("p(end of turn) %.3f, %s", p, "prefetched" if ready else "scored when asked")
        return p

    def prefetch(self, chat_ctx: Any, words: str, caller: Hashable = None) -> None:
        """Start scoring the caller's words so far (an interim or preflight transcript) after
        `chat_ctx`, so the session's question at the end of the turn finds it done. A caller's
        newer prefetch replaces their one still waiting for the worker."""
        scored = self.scorer.scored(
            [*chat_messages(chat_ctx), {"role": "user", "content": words}])
        if scored is None or self._cached(scored):
            return
        stale_key, stale = self._prefetched.pop(caller, (None, None))
        if stale is not None and stale.cancel() and self._scores.get(stale_key) is stale:
            del self._scores[stale_key]
        self._prefetched[caller] = scored, self._score(scored)
        while len(self._prefetched) > CACHED_SCORES:  # callers long gone
            self._prefetched.popitem(last=False)

    def follow(self, session: Any) -> None:
        """Prefetch a LiveKit session's turn as it will be asked about: the turn's final
        transcripts so far (LiveKit joins them when a caller resumes after a held pause), then
        the newest interim or preflight one."""
        finals: list[str] = []

        def transcribed(ev: Any) -> None:
            if ev.transcript:
                self.prefetch(session.history, " ".join([*finals, ev.transcript]), id(session))
                if ev.is_final:
                    finals.append(ev.transcript)

        def added(ev: Any) -> None:
            if getattr(ev.item, "role", None) == "user":  # the turn was committed
                finals.clear()

        session.on("user_input_transcribed", transcribed)
        session.on("conversation_item_added", added)

    def _cached(self, scored: Scored) -> bool:
        future = self._scores.get(scored)
        return future is not None and not future.cancelled()

    def _score(self, scored: Scored) -> Future[float]:
        future = self._scores.get(scored)
        if future is None or future.cancelled():  # a prefetch replaced before it ran
            future = self._scores[scored] = self._pool.submit(self.scorer.p_end_scored, scored)
            while len(self._scores) > CACHED_SCORES:
                self._scores.popitem(last=False)
        self._scores.move_to_end(scored)
        return future

    def for_session(self, hold: GradedHold,
                    pauses: PauseMemory | None = None) -> SessionTurnDetector:
        """One conversation's detector: these scores, a graded hold and the caller's learned
        pauses (see its class)."""
        return SessionTurnDetector(self, hold, pauses)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GradedHold(NamedTuple):
    """The silence a turn needs below the detector's threshold: `min_s` at the threshold,
    rising linearly in log p(end) to `max_s` at `floor` (and below it: LiveKit's own wait).
    `vad_silence_s`: how long the VAD has been hearing silence when it reports the end of
    speech."""

    floor: float
    min_s: float
    max_s: float
    vad_silence_s: float

    def silence_s(self, p: float, threshold: float) -> float:
        if p >= threshold:
            return self.min_s
        if p <= self.floor:
            return self.max_s
        share = math.log(threshold / p) / math.log(threshold / self.floor)
        return self.min_s + share * (self.max_s - self.min_s)


class PauseMemory:
    """The silence one caller's turns need, learned from the turns the agent took too soon.

    A turn the detector answered, followed by the caller speaking again before the agent's
    voice could have reached them and been answered (`REACTION_S`), was a pause, not the end:
    from then on the caller's turns wait for that pause plus `margin_s` (at most
    `LEARNED_PAUSE_CAP_S`). The pause runs from the start of the silence to the VAD's report of
    speech, which is also when LiveKit cancels a held answer. Each exchange in which the caller
    answers the agent's voice keeps `PAUSE_DECAY` of what was learned over `base_s` (a turn the
    agent never spoke after, such as a noise, changes nothing), and a pause the caller resumed
    from before any answer renews it, whichever wait held it open (the learned silence or the
    words' hold): a caller who keeps pausing keeps the silence they need. Times are the session
    events' `time.time()`; the caller's echo is assumed cancelled, as LiveKit's barge-in
    assumes after its AEC warm-up."""

    def __init__(self, base_s: float, margin_s: float):
        self.base_s, self.margin_s = base_s, margin_s
        self.silence_s = base_s
        self._answered: float | None = None  # the answered turn's silence began then
        self._agent_voice: float | None = None  # the agent's voice started after that answer

    def answered(self, quiet_since: float) -> None:
        """The detector ended the turn whose silence began at `quiet_since`."""
        if self._answered != quiet_since:
            self._answered, self._agent_voice = quiet_since, None

    def agent_speaking(self, at: float) -> None:
        if self._answered is not None and self._agent_voice is None:
            self._agent_voice = at

    def held(self, pause: float) -> None:
        """The caller spoke again `pause` into a silence nothing answered: a learned silence is
        still needed, so it is kept at least at `pause` plus the margin."""
        if self.silence_s > self.base_s and pause <= LEARNED_PAUSE_CAP_S:
            self._cover(pause)

    def resumed(self, at: float, silent_since: float | None = None) -> float | None:
        """The caller speaks at `at`, after a silence that began at `silent_since` (None: not
        known): the pause learned from it, or None (nothing answered the silence, or the caller
        is answering the agent)."""
        quiet_since, voice = self._answered, self._agent_voice
        self._answered = self._agent_voice = None
        if quiet_since is None:
            if silent_since is not None:
                self.held(at - silent_since)
            return None
        pause = at - quiet_since
        if voice is not None and at - voice >= REACTION_S:  # answering the agent's voice
            self.silence_s = self.base_s + (self.silence_s - self.base_s) * PAUSE_DECAY
            return None
        if pause > LEARNED_PAUSE_CAP_S:  # a turn of its own, after an agent slow to speak
            return None
        self._cover(pause)
        return pause

    def _cover(self, pause: float) -> None:
        self.silence_s = max(self.silence_s, min(LEARNED_PAUSE_CAP_S, pause + self.margin_s))


class SessionTurnDetector:
    """One conversation's view of a `TextTurnDetector`: its scores, a graded hold, and the
    caller's learned pauses (`PauseMemory`, optional).

    LiveKit knows two waits: its minimum endpointing delay when p(end) reaches the threshold,
    its maximum when it does not. At that cliff a score of 0.149 waits 2.5 s and one of 0.151
    0.3 s, so rounding (int8 kernels differ between CPUs) decides seconds of a caller's wait.
    This view gives LiveKit the hold's floor as its threshold and answers words scored between
    the floor and the detector's threshold once the caller has been quiet as long as
    `GradedHold.silence_s` asks: the less likely the words end the turn, the longer the
    silence (a floor of 0 keeps LiveKit's cliff). Any answer also waits for the silence the
    caller's pauses asked for. The answer is held on the event loop, and LiveKit cancels it
    when the caller speaks again. The silence is counted from the VAD's end of speech, which
    the session's `user_state_changed` event reports `vad_silence_s` after the silence began."""

    def __init__(self, shared: TextTurnDetector, hold: GradedHold,
                 pauses: PauseMemory | None = None):
        self.shared, self.hold, self.pauses = shared, hold, pauses
        self._quiet_since: float | None = None  # time.time() of the caller's last speech

    @property
    def model(self) -> str:
        return self.shared.model

    @property
    def provider(self) -> str:
        return self.shared.provider

    async def unlikely_threshold(self, language: Any) -> float | None:
        return min(self.hold.floor or 1.0, self.shared.threshold)

    async def supports_language(self, language: Any) -> bool:
        return await self.shared.supports_language(language)

    async def predict_end_of_turn(
        self, chat_ctx: Any, *, timeout: float | None = None  # noqa: ASYNC109 (the protocol's)
    ) -> float:
        p = await self.shared.predict_end_of_turn(chat_ctx, timeout=timeout)
        if p < await self.unlikely_threshold(None):
            return p  # LiveKit holds the turn for its maximum delay
        quiet_since, silence = self.quiet_since(), self.silence_s(p)
        wait = max(0.0, quiet_since + silence - time.time())
        if wait:
            log.debug("p(end of turn) %.3f: held %.3f s (for %.3f s of silence)", p, wait,
                      silence)
            await asyncio.sleep(wait)
        if self.pauses is not None:
            self.pauses.answered(quiet_since)
        return p

    def silence_s(self, p: float) -> float:
        """The silence words scored `p` (at least the floor) need before they are answered."""
        graded = self.hold.silence_s(p, self.shared.threshold) if self.hold.floor \
            else self.hold.min_s
        return max(graded, self.pauses.silence_s) if self.pauses is not None else graded

    def quiet_since(self) -> float:
        """When the caller's silence began (time.time())."""
        if self._quiet_since is not None:
            return self._quiet_since
        return time.time() - self.hold.vad_silence_s  # asked before the VAD's end of speech

    def follow(self, session: Any) -> None:
        """Score the session's transcripts ahead (`TextTurnDetector.follow`), track when the
        caller went quiet, and learn from their pauses."""
        self.shared.follow(session)

        def user(ev: Any) -> None:
            if ev.old_state == "speaking" and ev.new_state == "listening":
                self._quiet_since = ev.created_at - self.hold.vad_silence_s
            elif ev.new_state == "speaking":
                quiet_since, self._quiet_since = self._quiet_since, None
                if self.pauses is None:
                    return
                pause = self.pauses.resumed(ev.created_at, quiet_since)
                if pause is not None:
                    log.info("the caller resumed %.2f s into a pause the agent answered: "
                             "their turns now wait for %.2f s of silence", pause,
                             self.pauses.silence_s)

        def agent(ev: Any) -> None:
            if ev.new_state == "speaking" and self.pauses is not None:
                self.pauses.agent_speaking(ev.created_at)

        session.on("user_state_changed", user)
        session.on("agent_state_changed", agent)


def chat_messages(chat_ctx: Any) -> list[Message]:
    """A LiveKit chat context's user and assistant messages as [{role, content}]."""
    return [{"role": item.role, "content": item.text_content or ""} for item in chat_ctx.items
            if getattr(item, "role", None) in ("user", "assistant")]
