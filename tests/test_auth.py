"""Tokens decide who connects and what they may list, subscribe or watch."""

from __future__ import annotations

import json
import os
import time

import jwt
import pytest
import websockets
from support import running_gateway
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

SECRET = "test-secret-not-for-production-use-32b+"
PUB = "publisher-token"


def token(syms=None, ttl=60.0, secret=SECRET):
    claims = {"sub": "desk-7", "exp": int(time.time() + ttl)}
    if syms is not None:
        claims["syms"] = syms
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def gw():
    env = {"FASTFEED_JWT_SECRET": SECRET, "FASTFEED_PUBLISHER_TOKEN": PUB}
    with running_gateway(env=env) as g:
        with connect(g.ingest_url, additional_headers={"Authorization": f"Bearer {PUB}"}) as pub:
            pub.send(json.dumps([{"sym": s, "seq": 1, "last": 1.0}
                                 for s in ("BBCA", "BBRI", "TLKM", "ASII")]))
            time.sleep(0.2)
        yield g


@pytest.mark.parametrize(
    "tok", [None, "garbage", token(ttl=-10), token(secret="another-secret-of-at-least-32-bytes")]
)
async def test_missing_bad_or_expired_tokens_get_401(gw, tok):
    url = gw.ws_url + (f"?token={tok}" if tok else "")
    with pytest.raises(InvalidStatus) as e:
        async with websockets.connect(url):
            pass
    assert e.value.response.status_code == 401


async def test_token_in_header_or_query_is_accepted(gw):
    async with websockets.connect(gw.ws_url, additional_headers={
            "Authorization": f"Bearer {token()}"}) as ws:
        await ws.send('{"op":"ping"}')
        assert json.loads(await ws.recv())["type"] == "pong"
    async with websockets.connect(gw.ws_url + f"?token={token()}") as ws:
        await ws.send('{"op":"ping"}')
        assert json.loads(await ws.recv())["type"] == "pong"


async def test_entitlements_filter_list_subscribe_and_delivery(gw):
    async with websockets.connect(gw.ws_url + f"?token={token(['BB*'])}") as ws:
        await ws.send('{"op":"list"}')
        assert sorted(json.loads(await ws.recv())["symbols"]) == ["BBCA", "BBRI"]
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["BBCA", "TLKM"]}))
        err = json.loads(await ws.recv())
        assert err["code"] == "forbidden" and err["symbols"] == ["TLKM"]
        snap = json.loads(await ws.recv())
        assert snap["type"] == "snapshot" and [r[0] for r in snap["rows"]] == ["BBCA"]
        with connect(gw.ingest_url + f"?token={PUB}") as pub:
            pub.send(json.dumps([{"sym": "TLKM", "seq": 9}, {"sym": "BBCA", "seq": 9}]))
        seen = set()
        while "BBCA" not in seen:
            m = json.loads(await ws.recv())
            seen.update(r[0] for r in m.get("rows", []))
        assert "TLKM" not in seen


async def test_ingest_needs_the_publisher_token_when_one_is_set(gw):
    with pytest.raises(InvalidStatus) as e:
        async with websockets.connect(gw.ingest_url):
            pass
    assert e.value.response.status_code == 401


def test_operators_can_mint_tokens():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastfeed", "token", "--sub", "ops",
                          "--syms", "BB*,TLKM", "--secret", SECRET],
                         capture_output=True, text=True, check=True).stdout.strip()
    claims = jwt.decode(out, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "ops" and claims["syms"] == ["BB*", "TLKM"]


def test_operators_can_mint_delayed_tokens():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastfeed", "token", "--sub", "retail",
                          "--delay", "900", "--rt", "BB*", "--secret", SECRET],
                         capture_output=True, text=True, check=True).stdout.strip()
    claims = jwt.decode(out, SECRET, algorithms=["HS256"])
    assert claims["delay"] == 900 and claims["rt"] == ["BB*"]
    # a free tier's one delayed token for everyone: no --sub, named anonymous
    out = subprocess.run([sys.executable, "-m", "fastfeed", "token", "--delay", "900"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "FASTFEED_JWT_SECRET": SECRET}).stdout.strip()
    claims = jwt.decode(out, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "anonymous" and claims["delay"] == 900
    bad = subprocess.run([sys.executable, "-m", "fastfeed", "token", "--sub", "x", "--rt", "BB*",
                          "--secret", SECRET], capture_output=True, text=True)
    assert bad.returncode == 2 and "--delay" in bad.stderr


def test_entitlements_say_which_symbols_are_delayed():
    from fastfeed import auth

    tok = jwt.encode({"sub": "r", "exp": int(time.time() + 60), "delay": 900, "rt": ["BB*"]},
                     SECRET, algorithm="HS256")
    ent = auth.verify(tok, SECRET, 900)
    assert ent.delay == 900 and ent.delayed("TLKM") and not ent.delayed("BBCA")
    assert not auth.verify(token(), SECRET).delayed("TLKM")
    for claims in ({"delay": -1}, {"delay": "900"}, {"delay": 1.5}, {"rt": "BB*"}):
        bad = jwt.encode({"sub": "r", "exp": int(time.time() + 60), **claims}, SECRET,
                         algorithm="HS256")
        with pytest.raises(auth.AuthError, match="invalid token"):
            auth.verify(bad, SECRET)


async def test_a_token_over_the_gateways_maximum_delay_gets_403(gw):
    over = jwt.encode({"sub": "retail", "exp": int(time.time() + 60), "delay": 901},
                      SECRET, algorithm="HS256")
    with pytest.raises(InvalidStatus) as e:
        async with websockets.connect(gw.ws_url + f"?token={over}"):
            pass
    assert e.value.response.status_code == 403
    body = e.value.response.body.decode()
    assert "delayed 901s" in body and "--max-delay-s" in body
