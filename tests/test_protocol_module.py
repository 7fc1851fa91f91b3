"""The protocol's names and numbers live in `fastfeed.protocol`; every copy of them agrees.

The compiled core keeps C-level copies (it needs them as constants), the web
client its own (it is standalone JavaScript), and docs/protocol.md tells the
user: each is held equal to the protocol module here.
"""

from __future__ import annotations

import json
import pathlib
import re

from fastfeed import _core, client, metrics, protocol

ROOT = pathlib.Path(__file__).resolve().parent.parent
WEB_CLIENT = ROOT / "src" / "fastfeed" / "web" / "fastfeed.js"
DOC = ROOT / "docs" / "protocol.md"


def test_the_core_copies_are_the_protocol_module():
    assert _core.FIELDS == protocol.FIELDS
    assert _core.VALUE_FIELDS == protocol.VALUE_FIELDS
    assert _core.ROW_DTYPE.names == protocol.FIELDS
    assert _core.BIN_MAGIC == protocol.BIN_MAGIC
    assert _core.BATCH_MAGIC == protocol.BATCH_MAGIC
    # the core counts ticks per (source, outcome) in these orders
    assert _core.SOURCES == protocol.TICK_SOURCES
    assert _core.OUTCOMES == protocol.TICK_OUTCOMES


def test_the_python_client_re_exports_the_protocol_module():
    assert client.FIELDS is protocol.FIELDS
    assert client.Row._fields == protocol.FIELDS
    assert client.JSON_SUBPROTOCOL == protocol.JSON_SUBPROTOCOL
    assert client.BIN_SUBPROTOCOL == protocol.BIN_SUBPROTOCOL
    assert client.CLIENT_FAULT_CLOSE_CODES is protocol.CLIENT_FAULT_CLOSE_CODES
    assert metrics.ERROR_CODES is protocol.ERROR_CODES
    assert metrics.CLOSE_CODES is protocol.CLOSE_CODES


def _js_const(name: str) -> object:
    m = re.search(rf"export const {name} = (?:Object\.freeze\()?(.*?)\)?;\n",
                  WEB_CLIENT.read_text(), re.S)
    assert m is not None, f"{name} not found in fastfeed.js"
    return json.loads(re.sub(r",\s*]", "]", m.group(1)))  # a trailing comma is not JSON


def test_the_web_client_copies_are_the_protocol_module():
    assert tuple(_js_const("FIELDS")) == protocol.FIELDS
    assert _js_const("SUBPROTOCOL") == protocol.JSON_SUBPROTOCOL
    assert frozenset(_js_const("CLIENT_FAULT_CLOSE_CODES")) == protocol.CLIENT_FAULT_CLOSE_CODES
    assert _js_const("CHANNEL_QUOTE") == protocol.CHANNEL_QUOTE
    assert _js_const("CHANNEL_BOOK") == protocol.CHANNEL_BOOK
    assert _js_const("BOOK_DEPTH") == protocol.BOOK_DEPTH


def test_the_documented_close_codes_and_error_codes_are_the_protocol_module():
    doc = DOC.read_text()
    table = doc[doc.index("## Close codes, and when fastfeed sends each"):]
    documented = tuple(int(c) for c in re.findall(r"^\| (\d{4}) \|", table, re.M))
    assert documented == protocol.CLOSE_CODES
    assert set(protocol.CLOSE_MEANINGS) == set(protocol.CLOSE_CODES)
    for code in protocol.ERROR_CODES:
        assert f"`{code}`" in doc, code
