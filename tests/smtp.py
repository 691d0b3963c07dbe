"""A real SMTP server on loopback for tests (aiosmtpd), recording what it receives.

    with SmtpServer() as smtp:                       # or the `smtp_server` fixture
        ...send mail to smtp.host:smtp.port...
        [message] = smtp.wait_for_messages(1)
        message.envelope_to, message.message["Subject"], message.text, message.html

It can answer the first N RCPT or DATA commands with a given reply, to play a
server that is busy (`fail_rcpt_with=(451, "try later"), fail_times=2`) or
refuses for good (`fail_data_with=(550, "rejected")`, `fail_times=None`: always).
`django_settings()` gives the EMAIL_* settings that point Django's SMTP backend at it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server accepted it: the envelope and the parsed message."""

    envelope_from: str
    envelope_to: list[str]
    message: EmailMessage

    def _part(self, content_type: str) -> str | None:
        part = self.message.get_body(preferencelist=(content_type.split("/")[1],))
        if part is None or part.get_content_type() != content_type:
            return None
        return str(part.get_content())

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def text(self) -> str | None:
        return self._part("text/plain")

    @property
    def html(self) -> str | None:
        return self._part("text/html")


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.server.rcpt_delay:  # a slow server: the client waits for its answer
            await asyncio.sleep(self.server.rcpt_delay)
        reply = self.server._take_failure("RCPT", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.server._take_failure("DATA", ",".join(envelope.rcpt_tos))
        if reply:
            return reply
        self.server._record(envelope)
        return "250 Message accepted for delivery"


class _Controller(Controller):
    """Listens on a free port chosen by the OS (port 0), learnt once bound: no race for a port."""

    def _trigger_server(self) -> None:
        if self.port == 0 and isinstance(self.server, asyncio.Server):
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer:
    """An SMTP server on 127.0.0.1 and a free port, in a thread, that records the messages it accepts.

    `fail_rcpt_with` / `fail_data_with`: an SMTP reply (code, text) given instead
    of accepting the first `fail_times` RCPT / DATA commands (None: every one).
    `refused` lists the commands answered that way: ("RCPT", address) or ("DATA", recipients).
    """

    def __init__(
        self,
        *,
        fail_rcpt_with: tuple[int, str] | None = None,
        fail_data_with: tuple[int, str] | None = None,
        fail_times: int | None = 1,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        # Seconds each RCPT waits before it is answered (a slow server; set it at any time).
        self.rcpt_delay = 0.0
        self.messages: list[ReceivedMessage] = []
        self.refused: list[tuple[str, str]] = []
        # time.monotonic() of each refusal and of each accepted message, in order.
        self.refused_at: list[float] = []
        self.received_at: list[float] = []
        self._failures = {"RCPT": fail_rcpt_with, "DATA": fail_data_with}
        self._remaining = fail_times
        # Addresses refused at RCPT every time, with their reply (`refuse`).
        self._refused_addresses: dict[str, tuple[int, str]] = {}
        self._changed = threading.Condition()
        self._controller = _Controller(_Handler(self), hostname=host, port=0)

    # --- life cycle -------------------------------------------------------------

    def start(self) -> SmtpServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def django_settings(self) -> dict[str, Any]:
        """EMAIL_* settings that send through this server with Django's SMTP backend."""
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": self.host,
            "EMAIL_PORT": self.port,
            "EMAIL_HOST_USER": "",
            "EMAIL_HOST_PASSWORD": "",
            "EMAIL_USE_TLS": False,
            "EMAIL_USE_SSL": False,
            "EMAIL_TIMEOUT": 5,
        }

    # --- what happened ----------------------------------------------------------

    def wait_for_messages(self, count: int, timeout: float = 15.0) -> list[ReceivedMessage]:
        """The first `count` messages, once that many have arrived; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")
                self._changed.wait(left)
            return list(self.messages[:count])

    def set_failure(
        self,
        *,
        rcpt: tuple[int, str] | None = None,
        data: tuple[int, str] | None = None,
        times: int | None = 1,
    ) -> None:
        """Changes how the next commands are answered (e.g. for a server fixture already running)."""
        with self._changed:
            self._failures = {"RCPT": rcpt, "DATA": data}
            self._remaining = times

    def refuse(self, address: str, reply: tuple[int, str] | None = (550, "5.1.1 no such user")) -> None:
        """Refuses `address` at RCPT with `reply` from now on (None: accept it again)."""
        with self._changed:
            if reply is None:
                self._refused_addresses.pop(address.lower(), None)
            else:
                self._refused_addresses[address.lower()] = reply

    # --- called from the server's thread ----------------------------------------

    def _take_failure(self, command: str, detail: str) -> str | None:
        with self._changed:
            refused = self._refused_addresses.get(detail.lower()) if command == "RCPT" else None
            if refused is not None:
                self.refused.append((command, detail))
                self._changed.notify_all()
                return f"{refused[0]} {refused[1]}"
            failure = self._failures[command]
            if failure is None or self._remaining == 0:
                return None
            if self._remaining is not None:
                self._remaining -= 1
            self.refused.append((command, detail))
            self.refused_at.append(time.monotonic())
            self._changed.notify_all()
        code, text = failure
        return f"{code} {text}"

    def _record(self, envelope: Any) -> None:
        raw = (envelope.original_content or envelope.content).replace(b"\r\n", b"\n")
        parsed = message_from_bytes(raw, policy=policy.default)
        received = ReceivedMessage(
            envelope_from=envelope.mail_from,
            envelope_to=list(envelope.rcpt_tos),
            message=parsed,
        )
        with self._changed:
            self.messages.append(received)
            self.received_at.append(time.monotonic())
            self._changed.notify_all()
