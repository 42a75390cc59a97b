"""`diffvoice livekit start|dev`: the same agent as a LiveKit Agents worker.

The worker registers with a LiveKit server (`LIVEKIT_URL`, `LIVEKIT_API_KEY`,
`LIVEKIT_API_SECRET`) and answers every room it is dispatched to — browser or app participants,
and phone calls that LiveKit SIP routes into rooms through a trunk and a dispatch rule. Scaling
is LiveKit's: run more workers, on more machines, and the server spreads jobs over them.

Jobs run as threads of this one process (`JobExecutorType.THREAD`), not as forked processes:
the engine and speech models load once and every job's session shares them, so replies from
concurrent rooms are denoised in one batch.

    LIVEKIT_URL=wss://my.livekit.host LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... \\
        diffvoice livekit start
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobExecutorType

from agent.metrics import TurnReporter
from agent.phone import KeypadEntry, reply_to_keypad
from agent.session import Models, build_session
from agent.settings import Settings
from llm.settings import UsageError

logger = logging.getLogger(__name__)

REQUIRED_ENV = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")


def missing_env(env: Mapping[str, str] = os.environ) -> list[str]:
    """The LiveKit connection variables that are unset or empty."""
    return [name for name in REQUIRED_ENV if not env.get(name)]


def missing_env_message(missing: list[str]) -> str:
    return (
        f"set {', '.join(missing)} to reach your LiveKit server, e.g.\n"
        "  export LIVEKIT_URL=wss://your-project.livekit.cloud   # or ws://127.0.0.1:7880\n"
        "  export LIVEKIT_API_KEY=...  LIVEKIT_API_SECRET=...      # from the server's keys\n"
        "(without a LiveKit server, `diffvoice serve` and `diffvoice phone` need none of these)"
    )


class DiffvoiceWorker:
    """One agent per job, all built by the shared session factory from shared models."""

    def __init__(self, settings: Settings, models: Models) -> None:
        self.settings = settings
        self.models = models
        self.sessions: dict[str, AgentSession] = {}  # job id -> its running session

    def new_session(self, ctx: JobContext) -> tuple[AgentSession, Agent]:
        """The job's session: the same factory and settings as every other transport."""
        session, agent = build_session(self.settings, self.models, session_id=ctx.job.id)
        log = self.settings.phone.metrics_log or None
        TurnReporter(ctx.job.id, lambda _event: None, log).attach(session)
        return session, agent

    async def entrypoint(self, ctx: JobContext) -> None:
        """Answer one room: LiveKit's RoomIO carries the audio (a SIP caller's included)."""
        session, agent = self.new_session(ctx)
        job_id = ctx.job.id
        logger.info("job %s: joining room %s", job_id, ctx.room.name)
        self.sessions[job_id] = session
        session.on("close", lambda _event: self.sessions.pop(job_id, None))
        self._hear_keypad(ctx, session)
        await session.start(agent, room=ctx.room, record=False)
        if self.settings.session.greeting:
            session.say(self.settings.session.greeting)

    def _hear_keypad(self, ctx: JobContext, session: AgentSession) -> None:
        """SIP callers' keypad digits become a user turn, as on `diffvoice phone`."""
        phone = self.settings.phone
        entry = KeypadEntry(phone.dtmf_gap_s,
                            lambda digits: reply_to_keypad(session, phone.dtmf_text, digits))
        ctx.room.on("sip_dtmf_received", lambda event: entry.add(event.digit))
        session.on("close", lambda _event: entry.cancel())

    def server(self, **options: Any) -> AgentServer:
        """A LiveKit `AgentServer` running `entrypoint` for each dispatched job."""
        server = AgentServer(job_executor_type=JobExecutorType.THREAD, **options)
        server.rtc_session(self.entrypoint, agent_name=self.settings.phone.livekit_agent_name)
        return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mode", choices=["start", "dev"],
        help="start: production logging; dev: debug logging, for a development server",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    missing = missing_env()
    if missing:
        raise UsageError(missing_env_message(missing))
    from livekit.agents import cli

    from agent.session import load_models

    models = load_models(settings)  # once, before any job: every job's session shares them
    server = DiffvoiceWorker(settings, models).server()
    sys.argv = [f"{sys.argv[0]} livekit", args.mode]  # LiveKit's CLI reads its own argv
    try:
        cli.run_app(server)
    finally:  # an engine in its own process would otherwise outlive the worker by a second
        models.close()
    return 0
