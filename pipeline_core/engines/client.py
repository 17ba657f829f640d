"""The client of any OpenAI-compatible server: many requests in flight, each row's answer or its error, and the
failures sorted the way a scheduler needs them.

- 200: the row's text and its `usage` tokens.
- 400 and the other 4xx but 401, 403, 404, 408 and 429: the server rejects the row on its own merits (a prompt too
  long, a bad parameter): that row fails with the server's message; the run goes on.
- 401, 403, 404: the credentials or the model are wrong, for every row alike: the run stops (exit 1).
- a connection error, a timeout, 408, 429, 5xx: sent again after an exponential backoff with jitter, or after the
  server's Retry-After when it gives one; past model.engine.retries the run stops (exit 1), and the part in progress
  is not committed. A server batchrun started that died is started again, and its rows sent again, without using
  the retries.

Requests run on an asyncio loop in a thread of their own, so the run's thread hands a part's rows over and goes on
preparing the next part while the server works. Neither the API key nor the headers are ever logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from pipeline_core.errors import BatchrunError

log = logging.getLogger("batchrun")
BACKOFF_SECONDS = 0.5  # the first retry's wait; doubled each time, up to BACKOFF_CAP_SECONDS
BACKOFF_CAP_SECONDS = 30.0
RETRY_AFTER_CAP_SECONDS = 300.0  # a Retry-After beyond this is read as this
RETRIED_STATUS = {408, 429}
FATAL_STATUS = {401: "refused batchrun's credentials (model.engine.api_key)", 403: "refused access",
                404: "has no such endpoint or model"}


class ServerUnavailable(BatchrunError):
    """The server could not answer a request within model.engine.retries (exit 1: a scheduler retries later)."""


@dataclass
class Answer:
    """One row's outcome: its text or its error; the tokens the server counted; seconds from send to answer."""

    text: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    retries: int = 0
    stopped: bool = False  # not sent: the run was asked to stop


@dataclass
class ClientSettings:
    url: str
    api: str  # completions or chat
    max_concurrency: int
    request_timeout: float
    retries: int
    headers: dict  # the API key's Authorization among them: never logged


class ServerClient:
    """Requests to one server from a loop thread; `submit` hands a list of request bodies over and returns a Future of
    their answers, in the same order."""

    def __init__(self, settings: ClientSettings, server=None, should_stop=lambda: False):
        self.settings, self.server, self.should_stop = settings, server, should_stop
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="requests")
        self.thread.start()
        self.session, self.slots = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result()

    @property
    def endpoint(self) -> str:
        base = (self.server.url if self.server is not None else self.settings.url).rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        return base + ("/chat/completions" if self.settings.api == "chat" else "/completions")

    async def _open(self):
        import aiohttp  # deferred: only server engines pay for it

        connector = aiohttp.TCPConnector(limit=self.settings.max_concurrency, limit_per_host=0)
        return aiohttp.ClientSession(connector=connector), asyncio.Semaphore(self.settings.max_concurrency)

    def submit(self, bodies: list[dict]) -> Future:
        return asyncio.run_coroutine_threadsafe(self._all(bodies), self.loop)

    def close(self) -> None:
        """Cancel what is in flight, close the connections, end the loop thread."""
        if not self.loop.is_running():
            return

        async def shut() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.session.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    async def _all(self, bodies: list[dict]) -> list[Answer]:
        tasks = [asyncio.ensure_future(self._send(body)) for body in bodies]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one fatal answer ends the part: its other requests go too
                task.cancel()
            raise

    async def _send(self, body: dict) -> Answer:
        import aiohttp

        retries, started = 0, time.monotonic()
        while True:
            if self.should_stop():
                return Answer(stopped=True, retries=retries)
            starts = self.server.starts if self.server is not None else 0
            retry_after = None
            try:
                async with self.slots:
                    if self.should_stop():
                        return Answer(stopped=True, retries=retries)
                    sent = time.monotonic()
                    timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout)
                    async with self.session.post(self.endpoint, json=body, headers=self.settings.headers,
                                                 timeout=timeout) as response:
                        status, payload = response.status, await _payload(response)
                        retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                if await self._server_died(starts):
                    continue  # started again: the row is sent again, without using a retry
                reason = "no answer within model.engine.request_timeout" if isinstance(
                    error, asyncio.TimeoutError) else f"{type(error).__name__}: {error}"
            else:
                if status == 200:
                    return _answer(payload, self.settings.api, time.monotonic() - sent, retries)
                message = _message(payload)
                if status in FATAL_STATUS:
                    raise BatchrunError(f"the server {FATAL_STATUS[status]} (HTTP {status}): {message}")
                if status < 500 and status not in RETRIED_STATUS:
                    return Answer(error=f"the server rejected the row (HTTP {status}): {message}"[:1000],
                                  seconds=time.monotonic() - sent, retries=retries)
                reason = f"HTTP {status}: {message}"
            retries += 1
            if retries > self.settings.retries:
                raise ServerUnavailable(
                    f"the server did not answer after {self.settings.retries} retries over "
                    f"{time.monotonic() - started:.0f}s (model.engine.retries); the last: {reason[:500]}. Nothing "
                    "of the part in progress was committed; rerun the same command to resume")
            delay = _backoff(retries, retry_after)
            log.debug("request failed (%s); retry %d of %d in %.1fs", reason[:200], retries, self.settings.retries,
                      delay, extra={"event": "request_retry", "retry": retries})
            await asyncio.sleep(delay)

    async def _server_died(self, starts: int) -> bool:
        """After a connection error: whether the server batchrun started is gone, and if so start it again (in a
        thread, once for every request that saw it die)."""
        if self.server is None:
            return False
        for _ in range(10):  # the guard notices its server's exit within a fraction of a second
            if not self.server.alive():
                await asyncio.get_running_loop().run_in_executor(None, self.server.restart, starts)
                return True
            await asyncio.sleep(0.1)
        return False


async def _payload(response):
    try:
        return await response.json(content_type=None)
    except ValueError:
        return {"text": (await response.text())[:1000]}


def _message(payload) -> str:
    """The server's own words: OpenAI's error.message, FastAPI's detail, or the body."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("detail", "message", "error", "text"):
            if payload.get(key):
                return str(payload[key])
    return str(payload)[:500]


def _answer(payload: dict, api: str, seconds: float, retries: int) -> Answer:
    usage = payload.get("usage") or {}
    tokens = {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
              "completion_tokens": int(usage.get("completion_tokens") or 0)}
    try:
        choice = payload["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        return Answer(error=f"the server's answer holds no text: {str(payload)[:300]}", seconds=seconds,
                      retries=retries, **tokens)
    return Answer(text=text, seconds=seconds, retries=retries, **tokens)


def _backoff(retry: int, retry_after: str | None) -> float:
    """Exponential backoff with full jitter; the server's Retry-After (seconds or an HTTP date) when it is longer."""
    delay = random.uniform(0.5, 1.0) * min(BACKOFF_CAP_SECONDS, BACKOFF_SECONDS * 2 ** (retry - 1))
    asked = _retry_after_seconds(retry_after)
    return max(delay, min(asked, RETRY_AFTER_CAP_SECONDS)) if asked is not None else delay


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
