"""The protocol's names and numbers live in `fastfeed.protocol`; every copy of them agrees.

The compiled core keeps C-level copies (it needs them as constants; the JSON
fast path matches the field names in C), the web client and the board their
own (they are standalone JavaScript), and docs/protocol.md tells the user:
each is held equal to the protocol module here.
"""

from __future__ import annotations

import json
import pathlib
import re

from fastfeed import _core, client, metrics, protocol
from fastfeed._tickjson import TickParser

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


def test_the_documented_close_codes_and_error_codes_are_the_protocol_module():
    doc = DOC.read_text()
    table = doc[doc.index("## Close codes, and when fastfeed sends each"):]
    documented = tuple(int(c) for c in re.findall(r"^\| (\d{4}) \|", table, re.M))
    assert documented == protocol.CLOSE_CODES
    assert set(protocol.CLOSE_MEANINGS) == set(protocol.CLOSE_CODES)
    for code in protocol.ERROR_CODES:
        assert f"`{code}`" in doc, code


def test_the_json_fast_path_knows_every_field_by_its_protocol_name():
    # _tickjson matches key names in C; each name must land in its own column
    for name in protocol.FIELDS[2:]:
        value = 7 if name in protocol.INT_FIELDS else 1.5
        p, t = TickParser(), _core.Table(64)
        msg = json.dumps({"sym": "A", "seq": 1, name: value}).encode()
        assert p.parse(msg) == 1, f"the fast path declined the field {name!r}"
        assert p.apply(t)[:2] == (1, 0), name
        row = dict(zip(protocol.FIELDS, t.row(0), strict=True))
        assert (row["sym"], row["seq"], row[name]) == ("A", 1, value), (name, row)
        others = [f for f in protocol.VALUE_FIELDS if f != name and row[f] != 0]
        assert not others, f"{name!r} also set {others}"  # a field never set is 0


def test_the_close_codes_the_publisher_and_client_report_are_the_protocol_module():
    # the two codes RFC 6455 reserves for what an endpoint reports, never sends
    assert (protocol.CLOSE_NO_STATUS, protocol.CLOSE_ABNORMAL) == (1005, 1006)
    assert (client._NO_STATUS, client._ABNORMAL) == (
        protocol.CLOSE_NO_STATUS, protocol.CLOSE_ABNORMAL)


# Every close code the board's scripts compare with, by the protocol constant it
# stands for and a word the line (or the two after it) says about it.
WEB_CLOSE_CODES = {
    ("board.js", "CLOSE_POLICY"): "policy",
    ("board.js", "CLOSE_TRY_AGAIN_LATER"): "no data yet",
    ("board.js", "CLOSE_RESTART"): "restarting",
    ("fastfeed.js", "CLOSE_RESTART"): "draining",
    ("fastfeed.js", "CLOSE_TRY_AGAIN_LATER"): "try again later",
    ("fastfeed.js", "CLOSE_POLICY"): "policy",
}


def test_the_web_client_and_board_close_codes_are_the_protocol_module():
    names = {v: k for k, v in vars(protocol).items()
             if k.startswith("CLOSE_") and isinstance(v, int)}
    found = set()
    for script in ("board.js", "fastfeed.js"):
        lines = (WEB_CLIENT.parent / script).read_text().splitlines()
        for i, line in enumerate(lines):
            for code in re.findall(r"code === (\d+)\b", line):
                key = (script, names.get(int(code), code))
                assert key in WEB_CLOSE_CODES, f"{script}:{i + 1}: {code} is not a close " \
                    f"code of fastfeed.protocol, or not held here: {line.strip()}"
                assert WEB_CLOSE_CODES[key] in " ".join(lines[i : i + 3]), (key, line)
                found.add(key)
            # a lost socket or a timeout is reported as the abnormal close
            for code in re.findall(r"_scheduleReconnect\((\d+)", line):
                assert int(code) == protocol.CLOSE_ABNORMAL, f"{script}:{i + 1}: {line}"
    assert found == set(WEB_CLOSE_CODES)
