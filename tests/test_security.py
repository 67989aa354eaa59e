"""Mutual TLS: ``obdask certs init``, :func:`obdask.security.load`, real TLS clusters.

The cluster tests start a real ``dask scheduler`` and ``dask worker`` on
loopback with ``--protocol tls`` and the certificates ``obdask certs init``
wrote, then check that a good client runs a task and that a plaintext client,
a client without a certificate and a client whose certificate comes from
another CA are all refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_utils import START_TIMEOUT, dask_env, kill, spawn

from obdask import security
from obdask.exceptions import SecurityError

pytest.importorskip("cryptography")


def obdask_cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "obdask.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=dask_env(env))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls") / "certs"
    done = obdask_cli("certs", "init", folder, "--days", "30")
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls-other") / "certs"
    security.init_certs(folder)
    return folder


def _load_cert(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_init_writes_ca_and_three_roles_keys_private(certs):
    names = sorted(p.name for p in certs.iterdir())
    assert names == sorted(["ca.pem", "ca-key.pem", "scheduler.pem", "scheduler-key.pem",
                            "worker.pem", "worker-key.pem", "client.pem", "client-key.pem"])
    for path in certs.glob("*-key.pem"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for role in ("scheduler", "worker", "client"):
        assert stat.S_IMODE((certs / f"{role}.pem").stat().st_mode) == 0o644


def test_certs_default_names_validity_and_roles(certs):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = _load_cert(certs / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    sched = _load_cert(certs / "scheduler.pem")
    assert sched.issuer == ca.subject
    days = (sched.not_valid_after_utc - sched.not_valid_before_utc).days
    assert 29 <= days <= 31
    san = sched.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    usage = {r: set(_load_cert(certs / f"{r}.pem").extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value) for r in ("scheduler", "worker", "client")}
    both = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert usage["scheduler"] == both and usage["worker"] == both
    assert usage["client"] == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_certs_custom_hosts_ips_and_no_overwrite(tmp_path):
    from cryptography import x509

    folder = tmp_path / "c"
    done = obdask_cli("certs", "init", folder, "--host", "sched.example", "--ip", "10.0.0.7",
                      "--days", "3")
    assert done.returncode == 0, done.stderr
    san = _load_cert(folder / "worker.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sched.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    again = obdask_cli("certs", "init", folder)
    assert again.returncode == 2 and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    forced = obdask_cli("certs", "init", folder, "--force")
    assert forced.returncode == 0, forced.stderr
    bad = obdask_cli("certs", "init", tmp_path / "d", "--ip", "not-an-ip")
    assert bad.returncode == 2 and "not-an-ip" in bad.stderr


def test_load_gives_security_with_roles_and_required_encryption(certs):
    sec = security.load(certs)
    assert sec.require_encryption is True
    assert sec.tls_ca_file == str(certs / "ca.pem")
    assert (sec.tls_client_cert, sec.tls_client_key) == (
        str(certs / "client.pem"), str(certs / "client-key.pem"))
    assert sec.tls_scheduler_cert == str(certs / "scheduler.pem")
    assert sec.tls_worker_cert == str(certs / "worker.pem")
    assert sec.tls_worker_key == str(certs / "worker-key.pem")


def test_load_refuses_missing_folder_and_missing_ca(tmp_path):
    with pytest.raises(SecurityError, match="certs init"):
        security.load(tmp_path / "nope")
    (tmp_path / "client.pem").write_text("x")
    with pytest.raises(SecurityError, match="ca.pem"):
        security.load(tmp_path)


def test_load_only_roles_present(certs, tmp_path):
    part = tmp_path / "worker-only"
    part.mkdir()
    for name in ("ca.pem", "worker.pem", "worker-key.pem"):
        (part / name).write_bytes((certs / name).read_bytes())
    sec = security.load(part)
    assert sec.tls_worker_cert == str(part / "worker.pem")
    assert sec.tls_client_cert is None and sec.tls_scheduler_cert is None


# ------------------------------------------------------------- real TLS cluster


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    """A real ``dask scheduler`` + ``dask worker`` on loopback, TLS only; yields the address."""
    folder = tmp_path_factory.mktemp("tls-cluster")
    sfile = folder / "scheduler.json"
    tls = ["--tls-ca-file", str(certs / "ca.pem")]
    sched = spawn(["scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", "tls",
                   "--no-dashboard", "--scheduler-file", str(sfile), *tls,
                   "--tls-cert", str(certs / "scheduler.pem"),
                   "--tls-key", str(certs / "scheduler-key.pem"),
                   "--preload", "obdask.preload.scheduler"],
                  folder / "scheduler.log")
    procs = [sched]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (sfile.exists() and sfile.read_text().strip()):
            assert sched.poll() is None, (folder / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # the file may be half written
        address = json.loads(sfile.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:")
        procs.append(spawn(["worker", address, "--host", "127.0.0.1", "--no-dashboard",
                            "--nthreads", "1", "--no-nanny", "--name", "w1", *tls,
                            "--tls-cert", str(certs / "worker.pem"),
                            "--tls-key", str(certs / "worker-key.pem"),
                           "--preload", "obdask.preload.worker"],
                           folder / "worker.log"))
        yield address
    finally:
        kill(procs)


def _refused(address: str, sec) -> BaseException:
    from distributed import Client

    start = time.monotonic()
    with pytest.raises((OSError, TimeoutError)) as info:
        client = Client(address, security=sec, timeout=5)
        client.close()
    assert time.monotonic() - start < 60
    return info.value


@pytest.mark.slow
def test_good_client_submits_a_task(certs, tls_cluster):
    from distributed import Client

    with Client(tls_cluster, security=security.load(certs), timeout=60) as client:
        client.wait_for_workers(1, timeout=START_TIMEOUT)
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        workers = client.scheduler_info()["workers"]
        assert all(addr.startswith("tls://") for addr in workers)


@pytest.mark.slow
def test_plaintext_client_is_refused(tls_cluster):
    _refused(tls_cluster.replace("tls://", "tcp://"), None)


def _identity(address: str, ctx: ssl.SSLContext) -> dict:
    """Ask the scheduler who it is over a comm with TLS context ``ctx``."""
    from distributed.comm import connect

    async def ask() -> dict:
        comm = await connect(address, timeout=10, ssl_context=ctx, require_encryption=True)
        try:
            await comm.write({"op": "identity"})
            return await comm.read()
        finally:
            await comm.close()

    return asyncio.run(ask())


@pytest.mark.slow
def test_client_without_certificate_is_refused(certs, tls_cluster):
    # distributed's Security cannot express "TLS without a client certificate",
    # so build that context by hand; the same call with the client certificate works
    good = security.load(certs).get_connection_args("client")["ssl_context"]
    assert _identity(tls_cluster, good)["type"] == "Scheduler"
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    bare.check_hostname = False
    with pytest.raises((OSError, TimeoutError)):
        _identity(tls_cluster, bare)


@pytest.mark.slow
def test_client_certificate_from_another_ca_is_refused(certs, other_certs, tls_cluster):
    from distributed import Security

    # trusts the right CA (so the scheduler's certificate checks out) but its own
    # certificate is signed by another CA
    _refused(tls_cluster, Security(tls_ca_file=str(certs / "ca.pem"),
                                   tls_client_cert=str(other_certs / "client.pem"),
                                   tls_client_key=str(other_certs / "client-key.pem"),
                                   require_encryption=True))


@pytest.mark.slow
def test_client_of_another_ca_entirely_is_refused(other_certs, tls_cluster):
    _refused(tls_cluster, security.load(other_certs))


@pytest.mark.slow
def test_obdask_run_tls_embedded_cluster(certs, tmp_path):
    plan = tmp_path / "p.md"
    plan.write_text("# Plan: tls\n- [ ] id=a lane=1 payload=@cmd:echo hi > hi.txt\n")
    done = obdask_cli("run", plan, "--json", "--workers", "1", "--tls", certs, timeout=240)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    assert (tmp_path / "hi.txt").read_text() == "hi\n"


@pytest.mark.slow
def test_obdask_run_tls_against_tls_scheduler(certs, tls_cluster, tmp_path):
    plan = tmp_path / "p.md"
    plan.write_text("# Plan: tls2\n- [ ] id=a lane=1 payload=@cmd:echo ok > ok.txt\n")
    done = obdask_cli("run", plan, "--json", "--scheduler", tls_cluster, "--tls", certs,
                      timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tmp_path / "ok.txt").read_text() == "ok\n"
    plain = obdask_cli("run", plan, "--json", "--scheduler", tls_cluster, timeout=240,
                       env={"DASK_OBDASK__RUN__CONNECT_TIMEOUT": "5s"})
    assert plain.returncode != 0


def test_run_tls_folder_missing_is_one_line(tmp_path):
    plan = tmp_path / "p.md"
    plan.write_text("# Plan: x\n- [ ] id=a lane=1 payload=@cmd:true\n")
    done = obdask_cli("run", plan, "--tls", tmp_path / "none")
    assert done.returncode == 2 and "certs init" in done.stderr
    assert "Traceback" not in done.stderr


def test_keys_are_never_group_or_world_readable_even_with_lax_umask(tmp_path):
    old = os.umask(0)
    try:
        security.init_certs(tmp_path / "u")
    finally:
        os.umask(old)
    for path in (tmp_path / "u").glob("*-key.pem"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.slow
def test_embedded_cluster_is_tls_only(certs):
    from obdask.cluster import embedded_cluster

    with embedded_cluster(1, security=security.load(certs)) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        workers = client.scheduler_info()["workers"]
        assert workers and all(a.startswith("tls://") for a in workers)
        assert client.submit(len, "abc").result(timeout=60) == 3
        # the dashboard has no client certificates: it listens on loopback only
        hosts = client.run_on_scheduler(
            lambda dask_scheduler: [s.getsockname()[0] for s in
                                    dask_scheduler.http_server._sockets.values()])
        assert hosts and set(hosts) <= {"127.0.0.1"}, hosts
