"""Edgent end to end: partition export, sweep, profiles, fit, a real gRPC edge server, the client.

One smoke AlexNet bundle (5 exits, random weights: latency and wire behaviour
do not depend on training) is exported with partitions, profiled and fitted
once per test session; xdist workers share it through a file lock.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from open_inference.grpc import service as oip_service
from test_adb import fake_adb, host_binary  # noqa: F401  (fixtures)

from runtime import Bundle, BundleError, oip, planner
from runtime.edge_server import EdgeService, make_server

from conftest import ROOT, run_job

_EXPORT = """
import sys
from configs.mnist_alexnet_branchy import get_config
from export.bundle import export_model
from flexjax import models, training
import jax
config = get_config("smoke")
net = training.make_net(config, training.load_data(config))
variables = models.init(net, jax.random.PRNGKey(0))
export_model(config, net, variables, sys.argv[1], partitions=True, parity_examples=40,
             epsilons=[0.01], log=lambda *a: None)
"""


def _build(d: str) -> None:
    bundle, sweep = os.path.join(d, "bundle"), os.path.join(d, "sweep")
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    sweep_proc = subprocess.Popen(
        [sys.executable, "-m", "export.sweep", f"--out={sweep}", "--size=smoke"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT, bundle], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sweep_proc.wait(timeout=600) == 0, sweep_proc.stderr.read()[-3000:]
    for name, target, src in (
        ("edge_sweep", "local:threads=1", sweep),
        ("dev_sweep", "local:threads=1:slowdown=5", sweep),
        ("edge_parts", "local:threads=1", bundle),
        ("dev_parts", "local:threads=1:slowdown=5", bundle),
    ):
        out = os.path.join(d, f"{name}.json")
        run_job("runtime.profile", f"--bundle={src}", f"--target={target}", f"--out={out}",
                "--runs=5", check=True)  # fmt: skip
    run_job(
        "export.latency_fit", f"--bundle={bundle}", f"--device={d}/dev_sweep.json",
        f"--edge={d}/edge_sweep.json", f"--device-paths={d}/dev_parts.json",
        f"--edge-paths={d}/edge_parts.json", f"--report={d}/fit.json", check=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def edgent_dir(tmp_path_factory) -> str:
    """Shared dir: ``bundle/`` (partitions + fitted models), ``sweep/`` and the profiles."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this run
    d = str(root / "edgent_shared")
    with open(str(root / "edgent_shared.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(d, "done")):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            _build(d)
            open(os.path.join(d, "done"), "w").close()
    return d


@pytest.fixture(scope="module")
def bundle(edgent_dir) -> Bundle:
    return Bundle.from_dir(os.path.join(edgent_dir, "bundle"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundle):
    """A real gRPC edge server on 127.0.0.1 (in this process), with a shared token."""
    service = EdgeService(bundle, workers=4, token="s3cret")
    srv, port = make_server(service, "127.0.0.1:0", max_message_bytes=256 * 1024)
    srv.start()
    yield service, f"127.0.0.1:{port}"
    srv.stop(0)
    service.close()


# -- offline -------------------------------------------------------------------------------------


def test_partitions_cover_every_exit_and_cut_and_reproduce_exit_logits(bundle):
    part = bundle.manifest["partitions"]
    assert [e["name"] for e in part["exits"]] == [e["name"] for e in bundle.manifest["exits"]]
    assert len(part["exits"]) == 5
    for e in part["exits"]:
        assert set(e["edge"]) == {str(p) for p in part["cut_points"] if p <= e["stop"]} - {
            str(part["layers"])
        }
    assert part["parity"]["max_abs_diff"] < 1e-4
    # Device prefix + edge path, run here, equal the main model's segment + head chain.
    model = bundle.load_partitions()
    main = bundle.load()
    x = np.random.default_rng(0).random((1, 28, 28, 1), np.float32)
    h = main.signature("segment_7")(main.signature("segment_3")(x))
    want = main.signature("exit_7")(h)
    got = model.signature("edge_7_p04")(model.signature("dev_p04")(x))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert part["activations"]["4"]["bytes"] == 4 * int(np.prod(part["activations"]["4"]["shape"]))


def test_latency_fit_stores_models_and_reports_path_mape(bundle, edgent_dir):
    models = bundle.manifest["latency_models"]
    assert set(models) == {"device", "edge"}
    assert models["device"]["target"]["slowdown"] == 5.0
    fit = bundle.manifest["latency_fit"]
    assert {"conv", "dense", "lrn", "relu", "pool", "dropout"} <= set(fit["kinds"]["edge"])
    paths = fit["paths"]
    # Every (exit, partition) plus device-only per exit.
    n_edge = sum(len(e["edge"]) for e in bundle.manifest["partitions"]["exits"])
    assert paths["count"] == n_edge + 5
    # How well a 5-run smoke fit predicts depends on machine load, so the bound is on
    # consistency, not on quality: the reported MAPE is the one the stored rows give.
    rows = paths["paths"]
    pred = np.array([r["device_pred_ms"] + r["edge_pred_ms"] for r in rows])
    true = np.array([r["device_ms"] + r["edge_ms"] for r in rows])
    assert (true > 0).all() and np.isfinite(pred).all()
    ape = np.abs(pred - true) / true * 100
    np.testing.assert_allclose([r["ape"] for r in rows], ape, rtol=1e-9)
    assert paths["mape"] == pytest.approx(ape.mean(), rel=1e-9)
    assert paths["max_ape"] == pytest.approx(ape.max(), rel=1e-9)
    # The device really is slower than the edge, in measurement and in prediction.
    dev = json.load(open(os.path.join(edgent_dir, "dev_parts.json")))["signatures"]
    edge = json.load(open(os.path.join(edgent_dir, "edge_parts.json")))["signatures"]
    assert dev["edge_final_p00"]["median_ms"] > 2 * edge["edge_final_p00"]["median_ms"]
    opts = planner.options(bundle.manifest)
    full = {o.partition: o for o in opts if o.exit == "final"}
    assert full[None].device_ms > 2 * full[0].edge_ms


def test_corrupt_partition_model_is_one_bundle_error(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    path = copy / "partitions.tflite"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.from_dir(str(copy))
    proc = run_job("runtime.edge_server", f"--bundle={copy}", "--port=0", "--insecure")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_profile_and_fit_cli_reject_bad_input_in_one_line(bundle, edgent_dir, tmp_path):
    for args in (
        [f"--bundle={bundle.path}", "--target=phone", f"--out={tmp_path}/p.json"],
        [f"--bundle={tmp_path}/none", "--target=local", f"--out={tmp_path}/p.json"],
        [f"--bundle={bundle.path}", "--target=local:threads=0", f"--out={tmp_path}/p.json"],
    ):
        proc = run_job("runtime.profile", *args)
        assert proc.returncode in (1, 2) and proc.stderr.startswith("error:"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    # A partition profile is not a sweep profile.
    proc = run_job(
        "export.latency_fit", f"--bundle={bundle.path}", f"--device={edgent_dir}/dev_parts.json",
        f"--edge={edgent_dir}/edge_sweep.json",
    )  # fmt: skip
    assert proc.returncode == 1 and "sweep profile" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/p.json")


# -- the edge server -----------------------------------------------------------------------------


def _stub(address: str):
    """A channel and the protocol's generated stub (what a stock OIP client uses)."""
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])
    return ch, oip.Stub(ch)


META = oip.bearer("s3cret")


def _infer(stub, sig, x, rid, digest, **kw):
    reply = stub.ModelInfer(oip.infer_request(sig, x, request_id=str(rid), digest=digest),
                            metadata=META, **kw)  # fmt: skip
    return oip.read_output(reply, model=sig, request_id=str(rid), digest=digest,
                           shape=(1, 10))[0]  # fmt: skip


def test_edge_server_serves_16_concurrent_clients_without_mixups_amid_bad_requests(bundle, server):
    service, address = server
    part = bundle.manifest["partitions"]
    local = bundle.load_partitions()
    sigs = ["edge_final_p00", "edge_3_p02", "edge_7_p06", "edge_11_p12", "edge_final_p16"]
    rng = np.random.default_rng(1)
    inputs = []
    for k in range(16 * 6):
        sig = sigs[k % len(sigs)]
        shape = part["signatures"][sig]["input_shape"]
        x = rng.random(shape, np.float32)
        inputs.append((k, sig, x, local.signature(sig)(x).copy()))

    def good_client(c: int) -> int:
        ch, stub = _stub(address)
        ok = 0
        for k, sig, x, want in inputs[c::16]:
            np.testing.assert_allclose(_infer(stub, sig, x, k, bundle.digest), want, atol=1e-5)
            ok += 1
        ch.close()
        return ok

    x0 = np.zeros((1, 28, 28, 1), np.float32)
    good = oip.infer_request("edge_final_p00", x0, request_id="1").SerializeToString()
    bad_requests = [
        (b"garbage", grpc.StatusCode.INVALID_ARGUMENT),
        (good[:-100], grpc.StatusCode.INVALID_ARGUMENT),  # truncated payload
        (good[:10], grpc.StatusCode.INVALID_ARGUMENT),  # truncated header
        (oip.infer_request("full", x0).SerializeToString(),
         grpc.StatusCode.NOT_FOUND),  # not an edge signature
        (oip.infer_request("edge_final_p00", np.zeros((1, 28, 28, 3), np.float32))
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT),  # wrong shape
        (oip.infer_request("edge_final_p00", np.full((1, 28, 28, 1), np.nan, np.float32))
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT),  # NaN
        (good + bytes(300 * 1024), grpc.StatusCode.RESOURCE_EXHAUSTED),  # oversized
    ]  # fmt: skip

    def bad_client(_: int) -> int:
        ch, _stub_unused = _stub(address)
        infer = ch.unary_unary(f"/{oip.SERVICE}/ModelInfer")  # raw bytes
        seen = 0
        for _round in range(3):
            for req, code in bad_requests:
                with pytest.raises(grpc.RpcError) as e:
                    infer(req, metadata=META, timeout=10)
                assert e.value.code() == code, (req[:20], e.value.details())
                seen += 1
            with pytest.raises(grpc.RpcError) as e:  # no token
                infer(good, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ch.close()
        return seen

    served_before = service.served
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        goods = [pool.submit(good_client, c) for c in range(16)]
        bads = [pool.submit(bad_client, c) for c in range(4)]
        assert sum(f.result(timeout=120) for f in goods) == len(inputs)
        assert sum(f.result(timeout=120) for f in bads) == 4 * 3 * len(bad_requests)
    assert service.served - served_before == len(inputs)
    # Still serving afterwards.
    assert good_client(0) == len(inputs[0::16])


def test_edge_server_deadlines_end_calls_cleanly_and_it_keeps_serving(bundle, server):
    _, address = server
    ch, stub = _stub(address)
    x = np.zeros((1, 28, 28, 1), np.float32)
    codes = []
    for k in range(100):  # deadlines of 10 us: most expire in transit or on arrival
        try:
            _infer(stub, "edge_final_p00", x, k, bundle.digest, timeout=1e-5)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"} and "DEADLINE_EXCEEDED" in codes
    assert _infer(stub, "edge_final_p00", x, 5, bundle.digest, timeout=10).shape == (1, 10)
    ch.close()


# -- the device client ---------------------------------------------------------------------------


def _coinfer(bundle_path, edge, *extra, frames=30):
    return run_job(
        "runtime.coinfer", f"--bundle={bundle_path}", f"--edge={edge}", "--deadline-ms=40",
        "--bandwidth=5", f"--frames={frames}", "--data=mnist5k:test", *extra, timeout=300,
    )  # fmt: skip


def test_coinfer_runs_frames_through_a_real_server_and_logs_each(bundle, server, tmp_path):
    _, address = server
    out = tmp_path / "c.json"
    proc = _coinfer(bundle.path, address, "--token=s3cret", f"--json={out}", "--policy=edge-only")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    rows = rep["frames"]
    assert len(rows) == 30 and all(r["fallback"] is None for r in rows)
    assert all(r["plan"] == "final@edge-only" and r["edge"] == address for r in rows)
    for key in ("predicted_ms", "measured_ms", "exit", "correct", "network_ms", "edge_ms"):
        assert key in rows[0]
    # The emulated 5 Mbps link: each frame carries >= 3136 bytes up, so >= 5 ms of transfer.
    assert min(r["network_ms"] for r in rows) >= 3136 * 8 / 5e6 * 1e3
    # The client's bandwidth estimate comes from real transfers and lands near 5 Mbps
    # (at most 2x over: it subtracts a measured RTT, which moves with machine load).
    assert 1.5 < rows[-1]["est_mbps"] <= 10
    s = rep["summary"]
    # Frames answered by the edge are exactly those the local model would answer.
    assert s["frames"] == 30 and 0 <= s["accuracy"] <= 1


def test_coinfer_spreads_frames_over_servers_and_falls_back_when_one_dies(bundle, tmp_path):
    servers = []
    for _ in range(2):
        service = EdgeService(bundle, workers=2, insecure=True)
        srv, port = make_server(service, "127.0.0.1:0")
        srv.start()
        servers.append((srv, service, f"127.0.0.1:{port}"))
    dead = f"127.0.0.1:{_free_port()}"
    edges = ",".join([servers[0][2], servers[1][2], dead])

    # Kill the second server while the client runs: once it has answered 10 frames.
    def kill_second() -> None:
        until = time.monotonic() + 240
        while servers[1][1].served < 10 and time.monotonic() < until:
            time.sleep(0.005)
        servers[1][0].stop(0)

    killer = threading.Thread(target=kill_second)
    killer.start()
    out = tmp_path / "c.json"
    proc = _coinfer(bundle.path, edges, f"--json={out}", "--policy=edge-only", frames=120)
    killer.join()
    servers[0][0].stop(0)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and dead in proc.stderr  # the dead one is reported
    rep = json.loads(out.read_text())
    calls = {a: v["calls"] for a, v in rep["edges"].items()}
    assert calls[servers[0][2]] > 10 and calls[servers[1][2]] >= 10
    rows = rep["frames"]
    assert len(rows) == 120 and all("prediction" in r for r in rows)
    fell = [r for r in rows if r["fallback"]]
    assert fell, "the killed server must cause local fallbacks"
    assert all(r["local_rest_ms"] > 0 for r in fell)


class _Junk(oip_service.GRPCInferenceServiceServicer):
    """A hostile edge: answers probes properly, every inference with a malformed reply."""

    def ModelInfer(self, request, context):  # noqa: N802
        digest = request.parameters[oip.DIGEST].string_param
        if request.model_name == oip.PROBE:
            return oip.infer_response(request, np.array([0], "<i8"), digest=digest, server_ms=0,
                                      output=oip.PROBE_OUTPUT, datatype="INT64")  # fmt: skip
        # Logits of the wrong shape.
        return oip.infer_response(request, np.zeros((1, 3), np.float32), digest=digest,
                                  server_ms=0.1)  # fmt: skip


def test_coinfer_falls_back_on_garbage_responses(bundle, tmp_path):
    srv = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    oip_service.add_GRPCInferenceServiceServicer_to_server(_Junk(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        out = tmp_path / "g.json"
        proc = _coinfer(bundle.path, f"127.0.0.1:{port}", f"--json={out}", "--policy=edge-only",
                        "--cooldown-s=0", frames=5)  # fmt: skip
    finally:
        srv.stop(0)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["frames"]
    assert all("bad reply" in r["fallback"] for r in rows)
    # Still answered, by the local path, with the same prediction as the bundle's own final exit.
    ex = bundle.load_partitions()
    from runtime import data

    frames = data.load("mnist5k:test", bundle.manifest)
    for r in rows:
        want = int(ex.signature("edge_final_p00")(frames.x[r["frame"]][None]).argmax())
        assert r["prediction"] == want


def test_coinfer_bad_input_is_one_error_line(bundle, tmp_path):
    dead = f"127.0.0.1:{_free_port()}"
    trace = tmp_path / "bad.csv"
    trace.write_text("t_s,mbps\n0,1\n5,-2\n")
    cases = [
        _coinfer(bundle.path, dead),  # no edge reachable
        _coinfer(str(tmp_path / "nope"), dead),  # missing bundle
        run_job("runtime.coinfer", f"--bundle={bundle.path}", f"--edge={dead}",
                "--deadline-ms=10", f"--bandwidth={trace}"),
        run_job("runtime.coinfer", f"--bundle={bundle.path}", f"--edge={dead}",
                "--deadline-ms=10", "--bandwidth=fast"),
        run_job("runtime.coinfer", f"--bundle={bundle.path}", "--edge=nohostport",
                "--deadline-ms=10", "--bandwidth=1"),
    ]  # fmt: skip
    for proc in cases:
        assert proc.returncode in (1, 2), proc.stdout  # 2: refused while parsing
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_edge_server_cli_starts_and_answers_ping(bundle):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.edge_server", f"--bundle={bundle.path}", f"--port={port}",
         "--workers=1", "--token=s3cret"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "listening" in line, proc.stderr.read() if proc.poll() is not None else line
        assert "auth: token" in line
        ch, stub = _stub(f"127.0.0.1:{port}")
        reply = stub.ModelInfer(oip.probe_request(100, request_id="p"), metadata=META, timeout=10)
        y, _ = oip.read_output(reply, model=oip.PROBE, request_id="p", digest=bundle.digest,
                               shape=None, output=oip.PROBE_OUTPUT)  # fmt: skip
        assert int(y[0]) == 100
        ch.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "served 0" in out


def test_tls_server_talks_only_to_tls_clients(bundle, tmp_path):
    from runtime.coinfer import EdgeFailure, EdgePool

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    srv, port = make_server(
        EdgeService(bundle, workers=1, insecure=True), "127.0.0.1:0",
        tls=(cert.read_bytes(), key.read_bytes()),
    )  # fmt: skip
    srv.start()
    try:
        secure = EdgePool([f"127.0.0.1:{port}"], tls_ca=cert.read_bytes())
        ping = secure.ping(secure.edges[0], secure.probe_request(3), timeout_s=10)
        assert ping.received == 3
        plain = EdgePool([f"127.0.0.1:{port}"])
        with pytest.raises(EdgeFailure, match="UNAVAILABLE"):
            plain.ping(plain.edges[0], timeout_s=5)
        secure.close()
        plain.close()
    finally:
        srv.stop(0)


def test_edgent_runtime_runs_where_jax_and_tensorflow_cannot_be_imported(bundle, tmp_path):
    from test_runtime import _BLOCK

    code = _BLOCK + (
        "import runtime.coinfer, runtime.edge_server, runtime.edgent_bench, runtime.oip\n"
        "import runtime.planner as pl, runtime.profile as pr\n"
        f"assert pl.main(['--bundle={bundle.path}', '--deadline-ms=20']) == 0\n"
        f"assert pr.main(['--bundle={bundle.path}', '--target=local:threads=1:slowdown=3', "
        f"'--runs=1', '--out={tmp_path}/p.json']) == 0\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow', 'flax')]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clean" in proc.stdout and "predicted ms" in proc.stdout
    assert json.load(open(tmp_path / "p.json"))["kind"] == "partitions"


def test_profile_adb_target_times_sweep_signatures_on_the_stand_in_phone(
    edgent_dir,
    fake_adb,  # noqa: F811
    host_binary,  # noqa: F811
):
    from runtime import profile

    sweep = os.path.join(edgent_dir, "sweep")
    manifest = json.load(open(os.path.join(sweep, "manifest.json")))
    # Two layers, the probe and one loading model keep this to four benchmark_model runs.
    manifest["layers"] = [r for r in manifest["layers"] if r["signature"] in
                          ("conv_000", "dense_000", "probe")]  # fmt: skip
    manifest["loading"] = manifest["loading"][:1]
    target = profile.Target.parse("adb:emulator-5554")
    rep = profile.profile_sweep(manifest, sweep, target, runs=2, binary=host_binary)
    assert rep["overhead_ms"] > 0 and len(rep["layers"]) == 3
    assert all(r["median_ms"] > 0 for r in rep["layers"])
    assert rep["loading"][0]["median_ms"] > 0 and rep["loading"][0]["bytes"] > 0
    assert os.path.exists(fake_adb / "data/local/tmp/flexjax/sweep.tflite")
