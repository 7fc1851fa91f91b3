"""Autobahn|Testsuite's fuzzing client (`wstest`), installed by the tests themselves.

The last release that runs, autobahntestsuite 0.8.2, is Python 2 code, and
Debian 12 ships no Python 2. So on first use this module fetches Debian 11's
CPython 2.7 (and the two libraries Debian 12 no longer has, OpenSSL 1.1 and
libffi 7) from Debian's package mirror, unpacks the .deb files with
`dpkg-deb -x` under `.cache/autobahn/` in the repository (nothing is
installed on the system), makes a Python 2 virtualenv there (virtualenv < 20.22,
the last that seeds Python 2, comes with the `test` extra) and installs
autobahntestsuite with every dependency pinned. Later runs reuse it.

Every download is pinned: the .deb files by SHA-256, the Python 2 packages by
version. Needs `dpkg-deb` and a C compiler (two dependencies have C
extensions), and reaches Debian's mirror and PyPI. If the mirror is elsewhere
(or bullseye has moved to archive.debian.org), set FASTFEED_TEST_DEBIAN_MIRROR
to the URL holding `pool/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "autobahn"
MIRROR = os.environ.get("FASTFEED_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")

# Debian 11 (bullseye), amd64: CPython 2.7.18, its headers, and the libraries
# of its _ssl/_hashlib and _ctypes modules that Debian 12 no longer ships.
DEBS = (
    ("pool/main/p/python2.7/python2.7-minimal_2.7.18-8+deb11u1_amd64.deb",
     "44f0cdc1a343303d31c55fcb3a6402cfe326adf749ec30e375e6e0c0c5f7c1f7"),
    ("pool/main/p/python2.7/libpython2.7-minimal_2.7.18-8+deb11u1_amd64.deb",
     "85833c92314011b89bbead6f9a5a7a360b5ee4f9b95e001225afead4ebf9f7d3"),
    ("pool/main/p/python2.7/libpython2.7-stdlib_2.7.18-8+deb11u1_amd64.deb",
     "3e627d6d8992b853e000b8a4c09dda613fb767cdb711a2eac20ebc9f867b593c"),
    ("pool/main/p/python2.7/libpython2.7-dev_2.7.18-8+deb11u1_amd64.deb",
     "887034beb360069df8b519ad93893454ef3402415775a0466940fb73d6a8b8ca"),
    ("pool/main/o/openssl/libssl1.1_1.1.1w-0+deb11u1_amd64.deb",
     "aadf8b4b197335645b230c2839b4517aa444fd2e8f434e5438c48a18857988f7"),
    ("pool/main/libf/libffi/libffi7_3.3-6_amd64.deb",
     "30ca89bfddae5fa6e0a2a044f22b6e50cd17c4bc6bc850c579819aeab7101f0f"),
)
LIBDIR = "usr/lib/x86_64-linux-gnu"

# autobahntestsuite 0.8.2 and the last Python 2 release of each dependency
# that works with it (its own pins: autobahn 0.10.9, txaio <= 2.1.0). wsaccel
# is autobahn's masking and UTF-8 validation in C: without it section 9 (up to
# 16 MiB messages) took 44 s instead of 12 s on a 2-core machine.
PY2_PACKAGES = (
    "autobahntestsuite==0.8.2",
    "autobahn==0.10.9",
    "txaio==2.1.0",
    "wsaccel==0.6.6",
    "ujson==2.0.3",
    "Twisted==20.3.0",
    "zope.interface==5.5.2",
    "Automat==22.10.0",
    "attrs==21.4.0",
    "constantly==15.1.0",
    "hyperlink==21.0.0",
    "idna==2.10",
    "incremental==22.10.0",
    "PyHamcrest==1.10.1",
    "six==1.17.0",
    "typing==3.10.0.0",
    "klein==20.6.0",
    "Tubes==0.2.1",
    "Werkzeug==1.0.1",
    "Jinja2==2.11.3",
    "MarkupSafe==1.1.1",
    "pyOpenSSL==21.0.0",
    "cryptography==3.3.2",
    "cffi==1.15.1",
    "pycparser==2.21",
    "enum34==1.1.10",
    "ipaddress==1.0.23",
    "service-identity==21.1.0",
    "pyasn1==0.5.1",
    "pyasn1-modules==0.3.0",
    "unittest2==1.1.0",
    "traceback2==1.4.0",
    "linecache2==1.0.0",
)
# virtualenv 20.21 seeds a Python 2.7 environment with the pip 20.3.4,
# setuptools 44.1.1 and wheel 0.37.1 it carries inside: nothing downloaded


class SetupError(RuntimeError):
    """Autobahn|Testsuite could not be installed (the message says what to do)."""


@dataclass
class Wstest:
    exe: Path
    env: dict[str, str]


def ensure() -> Wstest:
    """The cached wstest, installed first if it is not there (or its pins changed)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SetupError(f"the pinned Python 2 for Autobahn is Debian amd64; this is "
                         f"{sys.platform}/{platform.machine()} (add pins in {__file__})")
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = CACHE / "ready"
    key = _key()
    with _locked(CACHE / ".lock"):
        wstest = Wstest(CACHE / "py2" / "bin" / "wstest", _py2_env())
        if not (stamp.exists() and stamp.read_text() == key and wstest.exe.exists()):
            stamp.unlink(missing_ok=True)
            _install(wstest.env)
            stamp.write_text(key)
    return wstest


def fuzzingclient(wstest: Wstest, url: str, cases: Sequence[str], outdir: Path,
                  exclude: Sequence[str] = (), timeout: float = 300.0) -> dict[str, dict]:
    """Run the fuzzing client against `url`; returns {case id: result} from its report.

    Each result has `behavior`, `behaviorClose`, `duration` (ms), `remoteCloseCode`
    and `report` (the case's own JSON report: description, expectation, wire log).
    """
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    spec = outdir / "fuzzingclient.json"
    spec.write_text(json.dumps({
        "outdir": str(outdir),
        "servers": [{"agent": "fastfeed", "url": url}],
        "cases": list(cases),
        "exclude-cases": list(exclude),
        "exclude-agent-cases": {},
    }, indent=2))
    log = outdir / "wstest.log"
    with log.open("wb") as out:
        proc = subprocess.run([str(wstest.exe), "-m", "fuzzingclient", "-s", str(spec)],
                              cwd=outdir, env=wstest.env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    index = outdir / "index.json"
    if proc.returncode != 0 or not index.exists():
        raise RuntimeError(f"wstest exited with {proc.returncode} and no report; its log "
                           f"({log}) ends:\n{_tail(log)}")
    results = json.loads(index.read_text())["fastfeed"]
    for r in results.values():
        r["report"] = json.loads((outdir / r["reportfile"]).read_text())
    return results


# ---- installation


def _key() -> str:
    h = hashlib.sha256()
    for part in (str(CACHE), *(sha for _, sha in DEBS), *PY2_PACKAGES):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # two test runs in one checkout install once
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _py2_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    libs = str(CACHE / "root" / LIBDIR)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    env["PYTHONWARNINGS"] = "ignore"  # cryptography's "Python 2 is no longer supported"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _install(env: dict[str, str]) -> None:
    root, py2 = CACHE / "root", CACHE / "py2"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(py2, ignore_errors=True)
    if shutil.which("dpkg-deb") is None:
        raise SetupError("dpkg-deb is needed to unpack Python 2.7 (it is part of every "
                         "Debian and Ubuntu)")
    debs = CACHE / "debs"
    debs.mkdir(exist_ok=True)
    for path, sha in DEBS:
        deb = debs / Path(path).name
        if not (deb.exists() and _sha256(deb) == sha):
            _download(f"{MIRROR}/{path}", deb, sha)
        _run(["dpkg-deb", "-x", str(deb), str(root)], env, f"unpacking {deb.name}")
    python2 = root / "usr" / "bin" / "python2.7"
    _run([str(python2), "-c", "import ssl, ctypes, hashlib"], env,
         "checking the unpacked Python 2.7")
    try:
        import virtualenv
    except ImportError:
        raise SetupError("virtualenv is missing: install the test extra "
                         "(pip install '.[test]')") from None
    if tuple(int(x) for x in virtualenv.__version__.split(".")[:2]) >= (20, 22):
        raise SetupError(f"virtualenv {virtualenv.__version__} cannot make Python 2 "
                         f"environments; the test extra pins < 20.22")
    _run([sys.executable, "-m", "virtualenv", "--quiet", "--no-periodic-update",
          "--app-data", str(CACHE / "app-data"), "-p", str(python2), str(py2)], env,
         "creating the Python 2 virtualenv")
    # two sdists have C extensions: the headers are in the unpacked tree (the
    # multiarch pyconfig.h under usr/include), not where Debian's python looks
    cflags = f"-I{root / 'usr/include/python2.7'} -I{root / 'usr/include'}"
    _run([str(py2 / "bin" / "pip"), "install", "--no-deps", "--no-build-isolation",
          "--no-cache-dir", "--quiet", *PY2_PACKAGES],
         {**env, "CFLAGS": (cflags + " " + env.get("CFLAGS", "")).strip()},
         "installing autobahntestsuite into the Python 2 virtualenv (from PyPI)")
    _run([str(py2 / "bin" / "python"), "-c",
          "import autobahntestsuite.wstest, wsaccel.utf8validator, wsaccel.xormask"],
         env, "checking the installed autobahntestsuite")


def _download(url: str, dest: Path, sha: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        raise SetupError(
            f"{url}: HTTP {e.code}. The pinned package has left the mirror: pin the "
            f"current file of bullseye's Packages index in {__file__}, or set "
            f"FASTFEED_TEST_DEBIAN_MIRROR to a mirror that keeps it") from None
    except OSError as e:
        raise SetupError(f"cannot download {url} ({e}): the Autobahn conformance test "
                         f"needs a Debian mirror ({MIRROR}; FASTFEED_TEST_DEBIAN_MIRROR names "
                         f"another) and PyPI") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise SetupError(f"{url}: SHA-256 {got}, pinned {sha}")
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(dest)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()
        raise SetupError(f"{what} failed ({proc.returncode}):\n" + "\n".join(out[-40:]))


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
