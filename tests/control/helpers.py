"""Small clients for the control-plane tests: JSON lines over any trio stream."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

MAX_LINE = 1 << 20


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test if it does not within the deadline.
    For conditions with no event to wait on (a socket file appearing)."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)


class LineClient:
    """One JSON object per line each way (the control socket; QMP as QEMU frames it)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        await self.stream.send_all(data)

    async def receive_line(self) -> bytes | None:
        """The next line, or None at EOF."""
        while (end := self._buf.find(b"\n")) < 0:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._buf += data
            assert len(self._buf) < MAX_LINE
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    async def receive(self) -> Any:
        line = await self.receive_line()
        return None if line is None else json.loads(line)

    async def request(self, cmd: str, **args: Any) -> Any:
        await self.send({"cmd": cmd, **args})
        return await self.receive()

    async def aclose(self) -> None:
        await self.stream.aclose()


class QmpClient(LineClient):
    """Keeps the events it meets while waiting for a reply."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.events: list[dict[str, Any]] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      **extra: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        await self.send(message)
        return await self.reply()

    async def reply(self) -> dict[str, Any]:
        while True:
            message = await self.receive()
            assert message is not None, "connection closed before the reply"
            if "event" in message:
                self.events.append(message)
                continue
            return message

    async def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        message = await self.receive()
        assert message is not None and "event" in message, message
        return message

    async def negotiate(self) -> dict[str, Any]:
        greeting = await self.receive()
        assert await self.execute("qmp_capabilities") == {"return": {}}
        return greeting


async def open_qmp(path) -> QmpClient:
    return QmpClient(await trio.open_unix_socket(str(path)))
