"""Structured logs: one line per event, text for people or JSON for collectors."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "ctx", None)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        try:
            line = super().format(record)
        finally:
            record.exc_info = exc_info
        extra = getattr(record, "ctx", None)
        if extra:  # on the line itself, before a traceback
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if exc_info:
            line += "\n" + self.formatException(exc_info)
        return line


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_picows_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # picows logs every protocol violation of every client at error level;
    # ours say the same thing once, with who and what to do. What it logs of
    # an exception it caught in our code goes through `unexpected` instead.
    logging.getLogger("picows").setLevel(logging.ERROR)


def ctx(**kw) -> dict:
    """`log.info("...", extra=ctx(client=..., code=...))`"""
    return {"ctx": kw}


class OncePerKind:
    """Rate-limited logging of repeated events: each kind (e.g. an exception
    type and the line that raised it) is logged the first time it happens,
    with its context and traceback; repeats are counted and summed up in one
    line per kind at most every `interval_s` (by `flush`, or by the next repeat)."""

    MAX_KINDS = 1000  # past it, unseen kinds are only counted in `dropped`

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 level: int = logging.ERROR) -> None:
        self.log = logger
        self.interval_s = interval_s
        self.level = level
        self.kinds: dict[Any, list[Any]] = {}  # kind -> [last logged at, repeats, last ctx]
        self.dropped = 0

    def report(self, kind: Any, msg: str, exc_info: Any = None, **kw: Any) -> bool:
        """Log `msg` if `kind` is new; else count it. True if a line was written."""
        now = time.monotonic()
        st = self.kinds.get(kind)
        if st is None:
            if len(self.kinds) >= self.MAX_KINDS:
                self.dropped += 1
                return False
            self.kinds[kind] = [now, 0, kw, msg]
            self.log.log(self.level, "%s (first of its kind; repeats are summed up every %gs)",
                         msg, self.interval_s, exc_info=exc_info, extra=ctx(**kw))
            return True
        st[1] += 1
        st[2] = kw
        if now - st[0] >= self.interval_s:
            self._summary(st, now)
            return True
        return False

    def flush(self) -> None:
        """Write the summary of every kind that repeated and is due (call periodically)."""
        now = time.monotonic()
        for st in self.kinds.values():
            if st[1] and now - st[0] >= self.interval_s:
                self._summary(st, now)

    def _summary(self, st: list[Any], now: float) -> None:
        self.log.log(self.level, "%s: %d more times in the last %.0fs (context of the last one)",
                     st[3], st[1], now - st[0], extra=ctx(**st[2]))
        st[0], st[1] = now, 0


def exception_kind(exc: BaseException) -> tuple[str, str]:
    """(exception type, file:line:function where it was raised): what 'once per kind' means."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}:{tb[-1].name}" if tb else "?"
    return type(exc).__qualname__, where


# Exceptions the gateway did not expect, from any client callback or task.
unexpected = OncePerKind(logging.getLogger("fastfeed.errors"))
# Called for every one of them, logged or not (metrics.Metrics counts them).
on_unexpected: Callable[[], Any] | None = None


def report_exception(exc: BaseException, what: str, **kw: Any) -> bool:
    """Log an unexpected exception once per kind, with who it happened to (`kw`)."""
    kind = exception_kind(exc)
    if on_unexpected is not None:
        on_unexpected()
    return unexpected.report(
        kind, f"unexpected {kind[0]} at {kind[1]} in {what}: {exc!s:.200}; this is a bug in "
              "fastfeed, please report it with this line and its traceback",
        exc_info=(type(exc), exc, exc.__traceback__), **kw)


def _picows_filter(record: logging.LogRecord) -> bool:
    """Let picows' records through only as once-per-kind reports of exceptions it caught."""
    if not record.name.startswith("picows"):
        return True
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        report_exception(exc, f"picows ({record.getMessage()})", logger=record.name)
    elif "exception" in str(record.msg).lower():
        if on_unexpected is not None:
            on_unexpected()
        unexpected.report(("picows", str(record.msg)), f"picows: {record.getMessage()}",
                          logger=record.name)
    return False
