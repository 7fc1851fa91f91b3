"""The container image, built from the project's Dockerfile and run with podman.

No container registry is needed. The Dockerfile's base, `debian:bookworm-slim`,
is made here from Debian's own archive the way the official image is made:
`debootstrap --variant=minbase bookworm`, trimmed like the slim variant
(no docs, man pages or locales; apt keeps no caches), then imported under its
public name. The Dockerfile is therefore exactly what a user builds with
`docker build`.

- The Debian mirror (and the proxy, if apt has one) come from this host's apt
  configuration, read at run time: the same archive `apt-get` uses here
  (FASTFEED_DEBOOTSTRAP_MIRROR names another, e.g. on Ubuntu).
- The trimmed rootfs is cached in `.cache/image/` (delete it to rebuild the
  base; `podman rmi debian:bookworm-slim` to re-import it); image layers are
  cached by podman, so a second run rebuilds only what changed.
- The build gets this host's CA bundle as the optional build secret `ca`, for
  pip behind a TLS-inspecting proxy; it never lands in a layer.
- podman runs with `--runtime runc` and a containers.conf with
  `default_ulimits = []` (the default raises limits some sandboxes refuse),
  on the host network; every container is removed at the end of its test,
  failed or not.

Needs podman, runc and debootstrap (`scripts/test` installs them) and root
(debootstrap, rootful podman).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import random
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import websockets
from fixtures import GatewayURLs
from redis_server import RedisServer
from support import free_port, http_get, merge, until
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "image"
SUITE = "bookworm"
BASE = "docker.io/library/debian:bookworm-slim"
TAG = "localhost/fastfeed:test"
# The runtime image, uncompressed as `podman image inspect` reports it. Measured
# at 227 MB: the base 78 MB, Debian's python3 with ca-certificates 48 MB, the
# venv 101 MB (numpy is most of it). The budget leaves 10 % for the
# dependencies' next releases; a bigger image should be a decision.
SIZE_BUDGET = 250 * 1000**2
FIELDS = ["sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size",
          "volume"]

# A cold build (debootstrap, apt in both stages, the Cython compile) takes minutes.
pytestmark = pytest.mark.timeout(1200)


# --------------------------------------------------------------------------- host apt


def _apt_config(name: str) -> str:
    """One value of this host's apt configuration ('' when unset)."""
    if not shutil.which("apt-config"):
        return ""
    out = subprocess.run(["apt-config", "shell", "V", name], capture_output=True, text=True,
                         check=False).stdout.strip()
    m = re.fullmatch(r"V='(.*)'", out)
    return m.group(1) if m else ""


def _apt_sources() -> list[tuple[str, str, list[str]]]:
    """Every enabled `deb` source of this host's apt: (uri, suite, components)."""
    etc = Path("/etc/apt")
    out: list[tuple[str, str, list[str]]] = []
    parts = Path(_apt_config("Dir::Etc::sourceparts") or etc / "sources.list.d")
    if not parts.is_absolute():
        parts = etc / parts
    lists = [etc / "sources.list", *sorted(parts.glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text(encoding="utf-8").splitlines():
                line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] == "deb":
                    out.append((line[1], line[2], line[3:]))
    for path in sorted(parts.glob("*.sources")):
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8")
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = ""
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                    elif ":" in line:
                        key, _, value = line.partition(":")
                        key = key.strip().lower()
                        fields[key] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        out.append((uri, suite, fields.get("components", "").split()))
    return out


def _debian_sources() -> list[tuple[str, str]]:
    """The host's sources of Debian bookworm's main archive: (uri, suite), the
    release itself first, then bookworm-updates and bookworm-security if listed.
    FASTFEED_DEBOOTSTRAP_MIRROR, when set, replaces the host's (e.g. on Ubuntu)."""
    mirror = os.environ.get("FASTFEED_DEBOOTSTRAP_MIRROR", "").rstrip("/")
    if mirror:
        return [(mirror, SUITE), (mirror, f"{SUITE}-updates")]
    found = [(uri.rstrip("/"), suite) for uri, suite, comps in _apt_sources()
             if "main" in comps and suite in (SUITE, f"{SUITE}-updates", f"{SUITE}-security")]
    found = list(dict.fromkeys(found))
    if not any(suite == SUITE for _, suite in found):
        pytest.fail(f"this host's apt has no source for Debian {SUITE} main "
                    "(/etc/apt/sources.list, /etc/apt/sources.list.d/): debootstrap needs "
                    "one to make the image's base; set FASTFEED_DEBOOTSTRAP_MIRROR to a "
                    "Debian mirror")
    return sorted(found, key=lambda s: (s[1] != SUITE, s[1]))


def _proxy_env() -> dict[str, str]:
    """The host's apt proxy as the usual environment variables, unless already set."""
    env = {}
    for scheme in ("http", "https"):
        value = _apt_config(f"Acquire::{scheme}::Proxy")
        if value and value.upper() != "DIRECT" and not os.environ.get(f"{scheme}_proxy"):
            env[f"{scheme}_proxy"] = value
    return env


def _ca_bundle() -> str | None:
    """This host's CA bundle (the one pip here trusts), for the `ca` build secret."""
    paths = ssl.get_default_verify_paths()
    for cand in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), paths.cafile,
                 "/etc/ssl/certs/ca-certificates.crt"):
        if cand and os.path.isfile(cand):
            return cand
    return None


# --------------------------------------------------------------------------- base image

# What the official slim image leaves out, as dpkg excludes, so packages the
# Dockerfile installs leave it out too (debuerreotype's "slimify").
SLIM_DPKG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""
# apt settings of the official images: no package caches, compressed lists.
SLIM_APT = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'),
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}


def _slim(rootfs: Path, sources: list[tuple[str, str]]) -> None:
    """Trim a debootstrap rootfs to what debian:bookworm-slim holds."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG)
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker-apt-speedup").write_text("force-unsafe-io\n")
    for name, text in SLIM_APT.items():
        (rootfs / "etc/apt/apt.conf.d" / name).write_text(text)
    share = rootfs / "usr/share"
    for sub in ("groff", "info", "linda", "lintian/overrides", "locale", "man"):
        for p in (share / sub).glob("*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (share / "doc").rglob("*"):
        if not p.is_dir() and p.name != "copyright":
            p.unlink()
    # no package lists, caches or logs of the bootstrap
    for d in ("var/lib/apt/lists", "var/cache/apt", "var/log"):
        for p in (rootfs / d).rglob("*"):
            if not p.is_dir():
                p.unlink()
    # the same apt sources as the official image's (deb822), from the host's mirror
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    stanzas = [f"Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n"
               "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
               for uri, suite in sources]
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text("\n".join(stanzas))
    # nothing of this host: podman provides these at run time
    for name in ("etc/resolv.conf", "etc/hostname", "etc/machine-id"):
        p = rootfs / name
        if p.exists() or p.is_symlink():
            p.unlink()
            p.write_text("")


def _rootfs(env: dict[str, str]) -> Path:
    """The trimmed Debian rootfs, from the cache or made with debootstrap."""
    done = CACHE / f"{SUITE}-slim-rootfs"
    if done.is_dir():
        return done
    sources = _debian_sources()
    part = CACHE / f"{SUITE}-slim-rootfs.part"
    if part.exists():
        shutil.rmtree(part)
    cmd = ["debootstrap", "--variant=minbase", SUITE, str(part), sources[0][0]]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        log = part / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else proc.stderr[-3000:]
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    _slim(part, sources)
    part.rename(done)
    return done


class Podman:
    """`podman --runtime runc ...` with this suite's containers.conf."""

    def __init__(self, conf: Path, extra_env: dict[str, str]) -> None:
        self.env = {**os.environ, **extra_env, "CONTAINERS_CONF": str(conf)}
        self.names = (f"fastfeed-test-{os.getpid()}-{i}" for i in itertools.count())

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        cmd = ["podman", "--runtime", "runc", *args]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, timeout=timeout,
                              check=False)
        out = proc.stdout.decode(errors="replace")
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n"
                                 f"{proc.stderr.decode(errors='replace')[-3000:]}")
        return out.strip()

    def import_(self, tar: IO[bytes] | None, name: str, message: str) -> None:
        """`podman import -` of a rootfs tar stream, with the official image's CMD."""
        proc = subprocess.run(["podman", "import", "--change", 'CMD ["bash"]', "--message",
                               message, "-", name], env=self.env, stdin=tar,
                              capture_output=True, timeout=300, check=False)
        assert proc.returncode == 0, f"podman import exited {proc.returncode}:\n" + \
            proc.stderr.decode(errors="replace")[-3000:]

    def ok(self, *args: str) -> bool:
        return subprocess.run(["podman", "--runtime", "runc", *args], env=self.env,
                              capture_output=True, timeout=60, check=False).returncode == 0

    def inspect(self, cid: str, fmt: str) -> str:
        return self("inspect", "--format", fmt, cid)

    @contextlib.contextmanager
    def gateway(self, image: str, **env: str) -> Iterator[Container]:
        """A gateway container on the host network, on a free port, removed at the end."""
        port = free_port()
        settings = {"FASTFEED_HOST": "127.0.0.1", "FASTFEED_PORT": str(port),
                    "FASTFEED_LOG_LEVEL": "info", **env}
        args = [a for k, v in settings.items() for a in ("-e", f"{k}={v}")]
        name = next(self.names)
        try:
            cid = self("run", "-d", "--name", name, "--network=host", *args, image)
            yield Container(self, cid, port)
        finally:
            self("rm", "--force", "--ignore", "--time", "0", name, check=False)

    def remove_leftovers(self) -> None:
        """Containers of an earlier session killed before it could remove them."""
        names = self("ps", "--all", "--filter", "name=^fastfeed-test-", "--format",
                     "{{.Names}}", check=False).split()
        for name in names:
            pid = name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                self("rm", "--force", "--ignore", "--time", "0", name, check=False)


class Container(GatewayURLs):
    def __init__(self, podman: Podman, cid: str, port: int) -> None:
        self.podman, self.cid, self.port = podman, cid, port

    def state(self, field: str) -> str:
        return self.podman.inspect(self.cid, "{{.State." + field + "}}")

    def logs(self) -> str:
        """What the gateway wrote (it logs to stderr, one JSON object a line)."""
        proc = subprocess.run(["podman", "logs", self.cid], env=self.podman.env,
                              capture_output=True, timeout=60, check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")

    async def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.state("Running") != "true":
                raise AssertionError(f"the container exited with {self.state('ExitCode')}:\n"
                                     + self.logs()[-3000:])
            with contextlib.suppress(OSError):
                return http_get(self.url + "/readyz", 0.5)[0] == 200
            return False

        await until(ready, timeout, step=0.1, what=f"/readyz 200 from {self.cid[:12]}")


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    missing = [t for t in ("podman", "runc", "debootstrap") if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install podman runc "
                    "debootstrap (scripts/test does)")
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap and rootful podman")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    podman = Podman(conf, _proxy_env())
    podman.remove_leftovers()
    return podman


@pytest.fixture(scope="session")
def image(podman: Podman) -> str:
    """The image built from the Dockerfile, once per session: its id."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one debootstrap and import at a time
        t0 = time.monotonic()
        if not podman.ok("image", "exists", BASE):
            rootfs = _rootfs({k: v for k, v in podman.env.items() if k.endswith("_proxy")})
            # tar -C rootfs -c . | podman import - debian:bookworm-slim
            with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."],
                                  stdout=subprocess.PIPE) as tar:
                podman.import_(tar.stdout, BASE, f"debootstrap --variant=minbase {SUITE}, "
                               "trimmed like the slim image")
            assert tar.returncode == 0, f"tar of {rootfs} exited {tar.returncode}"
        t1 = time.monotonic()
        iid = CACHE / "iid"
        secret = _ca_bundle()
        podman("build", "--pull=never", "--network=host", "--format", "docker",
               *(["--secret", f"id=ca,src={secret}"] if secret else []),
               "--iidfile", str(iid), "-t", TAG, str(ROOT), timeout=1200)
        t2 = time.monotonic()
        image_id = iid.read_text().strip()
    print(f"\nimage: base {t1 - t0:.1f}s, build {t2 - t1:.1f}s")
    return image_id


# --------------------------------------------------------------------------- clients


async def subscriber(url: str, syms: list[str] | None = None) -> tuple[object, dict, list]:
    """A websockets client subscribed to `syms` (default: every symbol the gateway
    lists); returns the socket, the snapshot rows by symbol, and the snapshot."""
    ws = await websockets.connect(url)
    if syms is None:
        await ws.send(json.dumps({"op": "list", "id": 1}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert msg["type"] == "list", msg
        syms = msg["symbols"]
    await ws.send(json.dumps({"op": "subscribe", "id": 2, "symbols": syms}))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg["type"] == "snapshot":
            break
    assert msg["fields"] == FIELDS and not msg["unknown"], msg
    return ws, {r[0]: r for r in msg["rows"]}, msg["rows"]


async def follow(ws, rows: dict) -> None:
    """Apply every update to `rows` (the newer seq wins) until the socket closes."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "update":
                for r in msg["rows"]:
                    if r[0] not in rows or r[1] > rows[r[0]][1]:
                        rows[r[0]] = r


# --------------------------------------------------------------------------- tests


async def test_image_serves_clients_as_uid_10001_and_is_healthy(podman, image):
    with podman.gateway(image, FASTFEED_SIMULATE="20", FASTFEED_RATE="400") as gw:
        await gw.wait_ready()
        status, body = http_get(gw.url + "/healthz")
        assert (status, body.strip()) == (200, b"ok")
        assert http_get(gw.url + "/readyz")[0] == 200

        ws, rows, snapshot = await subscriber(gw.ws_url)
        assert len(snapshot) == 20
        first = {s: r[1] for s, r in rows.items()}
        task = asyncio.ensure_future(follow(ws, rows))
        try:
            # updates from the simulated feed: most instruments move past the snapshot
            await until(lambda: sum(rows[s][1] > first[s] for s in first) >= 10, 30,
                        what="updates past the snapshot")
        finally:
            await ws.close()
            await task

        # the gateway is pid 1 of the container and runs as uid 10001, not root
        assert gw.state("Running") == "true"
        assert podman.inspect(gw.cid, "{{.Config.User}}") == "10001:10001"
        status = podman("exec", gw.cid, "cat", "/proc/1/status")
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids and uids.group(1).split() == ["10001"] * 4, status
        top = podman("top", gw.cid, "pid", "huser", "args").splitlines()
        assert any(ln.split()[:2] == ["1", "10001"] and "fastfeed serve" in ln for ln in top), top

        # the image's HEALTHCHECK, run by podman inside the container
        podman("healthcheck", "run", gw.cid)
        assert gw.state("Health.Status") == "healthy"


def test_image_size_and_contents(podman, image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image))
    print(f"\nimage size: {size / 1e6:.0f} MB (budget {SIZE_BUDGET / 1e6:.0f} MB)")
    assert size <= SIZE_BUDGET, f"the image is {size / 1e6:.0f} MB, over its budget"
    # no compiler, no pip, no build secret: the build stage stays behind
    out = podman("run", "--rm", "--network=none", "--entrypoint", "/bin/sh", image, "-c",
                 "for c in gcc cc pip pip3; do command -v $c; done; ls -A /run/secrets "
                 "2>/dev/null; /opt/fastfeed/bin/python -c 'import fastfeed._core; "
                 "print(\"core ok\")'", timeout=60)
    assert out == "core ok", out


async def test_podman_stop_drains_with_1012_and_exits_0(podman, image):
    n = 8
    with podman.gateway(image, FASTFEED_SIMULATE="20", FASTFEED_RATE="200",
                        FASTFEED_DRAIN_DELAY_S="1", FASTFEED_DRAIN_S="2") as gw:
        await gw.wait_ready()
        clients = [(await subscriber(gw.ws_url))[0] for _ in range(n)]
        t0 = time.monotonic()
        # `podman stop` sends the image's STOPSIGNAL (SIGTERM) and kills the container
        # only if it is still running after --time seconds: exit 0 means it drained.
        stop = asyncio.ensure_future(asyncio.to_thread(podman, "stop", "--time", "30", gw.cid,
                                                        timeout=60))
        await until(lambda: http_get(gw.url + "/readyz")[0] == 503, 20,
                    what="/readyz 503 while draining")

        async def closed(ws) -> tuple[int | None, str, float]:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed as e:
                return (e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else "",
                        time.monotonic() - t0)

        closes = await asyncio.gather(*map(closed, clients))
        await stop
        stopped = time.monotonic() - t0
        assert [c[0] for c in closes] == [1012] * n, closes
        assert all("reconnect" in c[1] for c in closes), closes
        assert gw.state("Status") == "exited"
        assert gw.state("ExitCode") == "0", gw.logs()[-3000:]
        logs = gw.logs()
        assert f"closing {n} clients over 2s after 1s" in logs, logs[-3000:]
        assert "drained, exiting" in logs, logs[-3000:]
        spread = max(c[2] for c in closes) - min(c[2] for c in closes)
        print(f"\ndrain: closes spread over {spread:.2f}s, stopped after {stopped:.2f}s, exit 0")


async def test_two_gateway_containers_share_state_through_redis(podman, image):
    syms = [f"IMG{i:02d}" for i in range(40)]
    rng = random.Random(7)
    seq = dict.fromkeys(syms, 0)
    ref: dict = {}

    def ticks(picks: list[str]) -> list[dict]:
        out = []
        for s in picks:
            seq[s] += rng.randint(1, 3)
            t = {"sym": s, "seq": seq[s], "ts": time.time_ns()}
            for f in FIELDS[3:]:
                if s not in ref or rng.random() < 0.5:
                    t[f] = round(rng.uniform(1, 1e4), 2)
            out.append(t)
        merge(ref, out)
        return out

    async def ingest(url: str, batch: list[dict]) -> None:
        """Push a batch to /ingest, then a bad tick: its error answers, and any
        error about the batch would come first."""
        async with websockets.connect(url) as pub:
            await pub.send(json.dumps(batch))
            await pub.send(json.dumps({"sym": "not a symbol!", "seq": 1}))
            msg = json.loads(await asyncio.wait_for(pub.recv(), 10))
            assert msg["type"] == "error" and "not a symbol!" in json.dumps(msg), msg

    def want() -> dict:
        return {s: [s, t["seq"], t["ts"], *[t[f] for f in FIELDS[3:]]] for s, t in ref.items()}

    with RedisServer() as redis:
        env = {"FASTFEED_REDIS": redis.url, "FASTFEED_REDIS_CHANNELS": "4",
               "FASTFEED_FEED_GRACE_S": "30"}
        with podman.gateway(image, **env) as a, podman.gateway(image, **env) as b:
            await a.wait_ready()
            await b.wait_ready()
            # every symbol enters through gateway a; b learns them through Redis
            await ingest(a.ingest_url, ticks(syms))

            async def known_to_b() -> None:
                async with websockets.connect(b.ws_url) as ws:
                    while True:
                        await ws.send(json.dumps({"op": "list", "id": 1}))
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        if sorted(msg.get("symbols", [])) == syms:
                            return
                        await asyncio.sleep(0.05)

            await asyncio.wait_for(known_to_b(), 30)
            subs = [await subscriber(g.ws_url, syms) for g in (a, b)]
            tasks = [asyncio.ensure_future(follow(ws, rows)) for ws, rows, _ in subs]
            try:
                for k in range(20):
                    await ingest((a, b)[k % 2].ingest_url, ticks(rng.choices(syms, k=50)))
                await until(lambda: all(rows == want() for _, rows, _ in subs), 30,
                            what="both clients at the last published state")
                assert subs[0][1] == subs[1][1]
            finally:
                for ws, _, _ in subs:
                    await ws.close()
                await asyncio.gather(*tasks)
