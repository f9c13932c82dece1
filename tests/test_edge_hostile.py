"""The edge server over the Open Inference Protocol, against stock clients and hostile peers.

A real server on 127.0.0.1 runs the smoke AlexNet partitions (the shared
Edgent fixture) in real LiteRT; clients are the protocol's own generated stub
(`open_inference.grpc`) or raw gRPC calls carrying hand-broken bytes. Bad
calls are generated (`runtime.edge_loadtest.hostile_cases`,
`test_edgent_units.reply_mutations`), not listed.
"""

# ruff: noqa: F811  (the shared fixtures are imported, then named as arguments)

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
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
from open_inference.grpc import protocol as pb
from open_inference.grpc import service as oip_service
from test_edgent_system import bundle, edgent_dir  # noqa: F401  (fixtures)
from test_edgent_units import reply_mutations

from runtime import Bundle, edge_server, oip
from runtime.coinfer import CoInference, EdgePool, Link
from runtime.edge_loadtest import hostile_cases
from runtime.edge_server import EdgeService, make_server
from runtime.encoding import ENCODINGS, calibrate
from runtime.names import MANIFEST, MANIFEST_DIGEST

from conftest import ROOT, run_job

TOKEN = "s3cret"
META = oip.bearer(TOKEN)
MAX_MESSAGE = 256 * 1024


def _serve(bundle_, **kw):
    opts = {"workers": 2, "token": TOKEN, "call_timeout_s": 0.5, "log_per_s": 100_000, **kw}
    pending = opts.pop("max_pending", 32)
    address = opts.pop("address", "127.0.0.1:0")
    service = EdgeService(bundle_, **opts)
    srv, port = make_server(service, address, max_pending=pending, max_message_bytes=MAX_MESSAGE)
    srv.start()
    return service, srv, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(bundle):
    service, srv, address = _serve(bundle)
    yield service, address
    srv.stop(0)
    service.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edge_models(bundle_) -> list[str]:
    part = bundle_.manifest["partitions"]
    return sorted({s for e in part["exits"] for s in e["edge"].values()})


# -- a stock client ------------------------------------------------------------------------------


def test_stock_client_reads_metadata_and_runs_every_edge_model_in_every_encoding(bundle, server):
    service, address = server
    ch = grpc.insecure_channel(address)
    stub = oip_service.GRPCInferenceServiceStub(ch)  # the protocol's own generated client
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # no token: health probe
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=META, timeout=10)
    assert meta.name == oip.SERVER_NAME
    local = bundle.load_partitions()
    rng = np.random.default_rng(0)
    models = _edge_models(bundle)
    assert len(models) >= 10
    for k, name in enumerate(models):
        assert stub.ModelReady(pb.ModelReadyRequest(name=name), metadata=META, timeout=10).ready
        md = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), metadata=META, timeout=10)
        sig = local.signature(name)
        assert md.name == name and md.versions == [oip.VERSION]
        assert [(t.name, t.datatype, tuple(t.shape)) for t in md.inputs] == [
            (oip.INPUT, "FP32", sig.input_shape)]  # fmt: skip
        assert [(t.name, t.datatype, tuple(t.shape)) for t in md.outputs] == [
            (oip.OUTPUT, "FP32", sig.output_shape)]  # fmt: skip
        assert md.properties[oip.DIGEST] == bundle.digest
        assert md.properties[oip.ENCODINGS].split(",") == list(ENCODINGS)
        x = rng.standard_normal(sig.input_shape).astype(np.float32)
        enc = calibrate(ENCODINGS[k % 3], [x])
        req = oip.infer_request(name, x, enc, request_id=f"r{k}", digest=bundle.digest)
        assert req.inputs[0].datatype == enc.oip_datatype
        reply = stub.ModelInfer(req, metadata=META, timeout=10)
        assert reply.model_name == name and reply.id == f"r{k}"
        assert reply.parameters[oip.DIGEST].string_param == bundle.digest
        assert reply.parameters[oip.SERVER_MS].double_param > 0
        (out,) = reply.outputs
        assert (out.name, out.datatype, tuple(out.shape)) == (oip.OUTPUT, "FP32", sig.output_shape)
        y = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(sig.output_shape)
        # The server decoded what the device encoded: the same as running it here.
        np.testing.assert_allclose(y, sig(enc.roundtrip(x)), atol=1e-5)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="full"), metadata=META, timeout=10).ready
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="full"), metadata=META, timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # everything but health needs the token
        stub.ModelMetadata(pb.ModelMetadataRequest(name=models[0]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


# -- bad calls -----------------------------------------------------------------------------------


def test_every_generated_bad_call_gets_its_status_and_one_log_line(bundle, server, caplog):
    service, address = server
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                 ("grpc.max_metadata_size", 1 << 20)])  # fmt: skip
    model = "edge_final_p00"
    shape = bundle.load_partitions().signature(model).input_shape
    cases = hostile_cases(model, shape, bundle.digest, MAX_MESSAGE)
    assert len(cases) >= 60
    logged_codes = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}
    caplog.set_level(logging.WARNING, logger="runtime.edge_server")
    for name, method, body, extra, codes in cases:
        call = ch.unary_unary(f"/{oip.SERVICE}/{method}")
        before = len(caplog.records)
        with pytest.raises(grpc.RpcError) as e:
            call(body, metadata=(*META, *extra), timeout=30)
        code = e.value.code().name
        assert code in codes, (name, code, e.value.details())
        if code in logged_codes:  # refused by the server itself: one line saying why
            new = [r.getMessage() for r in caplog.records[before:]
                   if r.name == "runtime.edge_server"]  # fmt: skip
            assert len(new) == 1 and new[0].startswith(code), (name, new)
    # Still serving, and nothing bad was served.
    x = np.zeros(shape, np.float32)
    reply = oip.Stub(ch).ModelInfer(oip.infer_request(model, x, request_id="ok"), metadata=META,
                                    timeout=10)  # fmt: skip
    assert oip.read_output(reply, model=model, request_id="ok", digest=bundle.digest,
                           shape=(1, 10))[0].shape == (1, 10)  # fmt: skip
    ch.close()


def _never(stop: threading.Event):
    while not stop.wait(0.05):
        pass
    return
    yield b""


def test_calls_without_token_or_body_never_starve_authenticated_ones(bundle):
    service, srv, address = _serve(bundle, workers=1, max_pending=12, call_timeout_s=1.0)
    ch = grpc.insecure_channel(address)
    stub = oip.Stub(ch)
    hold = ch.stream_unary(f"/{oip.SERVICE}/ModelInfer")
    stop = threading.Event()
    x = np.random.default_rng(0).random((1, 28, 28, 1), np.float32)
    want = bundle.load_partitions().signature("edge_final_p00")(x)

    def good(k: int) -> None:
        req = oip.infer_request("edge_final_p00", x, request_id=str(k), digest=bundle.digest)
        y, _ = oip.read_output(stub.ModelInfer(req, metadata=META, timeout=30),
                               model="edge_final_p00", request_id=str(k), digest=bundle.digest,
                               shape=(1, 10))  # fmt: skip
        np.testing.assert_allclose(y, want, atol=1e-5)

    try:
        # 40 calls held open with no token: refused on their headers, before any body (a
        # burst beyond max_pending is refused by the bound itself) ...
        no_token = [hold.future(_never(stop), timeout=60) for _ in range(40)]
        codes = [f.exception(timeout=30).code() for f in no_token]
        assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert service.refused["UNAUTHENTICATED"] == codes.count(grpc.StatusCode.UNAUTHENTICATED)
        # ... 6 with the token but no body, held by the server until call_timeout_s ...
        bodiless = [hold.future(_never(stop), metadata=META, timeout=60) for _ in range(6)]
        # ... while 20 good requests all get their right answer.
        for k in range(20):
            good(k)
        for f in bodiless:  # the client would wait 60 s; the server ends them
            assert f.exception(timeout=30).code() == grpc.StatusCode.CANCELLED
        assert service.watchdog.cancelled == 6  # counted before the cancel is sent
        # Pending calls are bounded: 16 bodiless calls against max_pending=12.
        flood = [hold.future(_never(stop), metadata=META, timeout=60) for _ in range(16)]
        codes = [f.exception(timeout=30).code() for f in flood]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        good(99)  # and once they are cut, the server serves again
    finally:
        stop.set()
        ch.close()
        srv.stop(0)
        service.close()


# -- starting: tokens and ports ------------------------------------------------------------------


def test_server_refuses_to_start_without_a_real_token_unless_insecure(bundle, tmp_path, capsys):
    empty, blank = tmp_path / "empty", tmp_path / "blank"
    empty.write_text("")
    blank.write_text(" \n\t\n")
    base = [f"--bundle={bundle.path}", "--port=0"]
    for extra in ([], ["--token="], ["--token=   "], [f"--token-file={empty}"],
                  [f"--token-file={blank}"], ["--token=x", "--insecure"],
                  ["--token=x", f"--token-file={blank}"]):  # fmt: skip
        try:
            status = edge_server.main(base + extra)
        except SystemExit as e:  # refused while parsing
            status = e.code
        assert status in (1, 2), extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (extra, err)
    with pytest.raises(ValueError, match="no token"):
        EdgeService(bundle)
    with pytest.raises(ValueError, match="empty"):
        EdgeService(bundle, token="")


def test_second_server_on_the_same_port_fails_with_one_error_line(bundle):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    first = subprocess.Popen(
        [sys.executable, "-m", "runtime.edge_server", f"--bundle={bundle.path}", f"--port={port}",
         "--workers=1", "--insecure"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = first.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in line and "auth: OFF" in line, line
        second = run_job("runtime.edge_server", f"--bundle={bundle.path}", f"--port={port}",
                         "--insecure")  # fmt: skip
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert lines[0].startswith("error:") and "in use" in lines[0]
        service = EdgeService(bundle, workers=1, insecure=True)
        with pytest.raises(RuntimeError, match="in use"):  # the library refuses the same way
            make_server(service, f"127.0.0.1:{port}")
        service.close()
    finally:
        first.terminate()
        first.communicate(timeout=30)
    # Any other process's socket too, not only another edge server.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        service = EdgeService(bundle, workers=1, insecure=True)
        with pytest.raises(RuntimeError, match="in use"):
            make_server(service, f"127.0.0.1:{s.getsockname()[1]}")
        service.close()


# -- the client against unlucky and lying servers ------------------------------------------------


def _other_bundle(bundle_, tmp_path) -> Bundle:
    """A copy of the bundle whose manifest (hence digest) differs."""
    other = tmp_path / "other"
    shutil.copytree(bundle_.path, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["note"] = "another export"
    raw = json.dumps(manifest).encode()
    (other / MANIFEST).write_bytes(raw)
    (other / MANIFEST_DIGEST).write_text(hashlib.sha256(raw).hexdigest() + "\n")
    b = Bundle.from_dir(str(other))
    assert b.digest != bundle_.digest
    return b


def _client(bundle_, address, *, link="1000", deadline_ms=1000.0, cooldown_s=0.0):
    pool = EdgePool([address], token=TOKEN, digest=bundle_.digest, cooldown_s=cooldown_s)
    rtt, problems = pool.connect(bundle_.digest, pings=2)
    client = CoInference(bundle_, pool, Link.parse(link), deadline_ms=deadline_ms,
                         policy="edge-only")  # fmt: skip
    client.start(rtt, pool.min_rtt_s)
    return client, pool, problems


def _x(k: int) -> np.ndarray:
    # A frame's pixels (k / 255): edge-only sends them as uint8 (lossless), as a camera would.
    return np.round(np.random.default_rng(k).random((28, 28, 1)) * 255).astype(np.float32) / 255


def _local(bundle_, k: int) -> int:
    return int(bundle_.load_partitions().signature("edge_final_p00")(_x(k)[None]).argmax())


def test_a_server_restarted_with_another_bundle_is_caught_on_its_first_reply(bundle, tmp_path):
    other = _other_bundle(bundle, tmp_path)
    service, srv, address = _serve(bundle)
    client, pool, problems = _client(bundle, address)
    assert not problems
    row, _ = client.frame(0, _x(0), 0, False)
    assert row["fallback"] is None and row["edge"] == address
    srv.stop(0).wait()
    service.close()
    service, srv, _ = _serve(other, address=address)  # same port, another bundle
    try:
        for k in range(1, 200):  # frames before the channel reconnects fail as UNAVAILABLE
            row, _ = client.frame(k, _x(k), 0, False)
            assert row["fallback"] and row["prediction"] == _local(bundle, k)
            if "UNAVAILABLE" not in row["fallback"]:
                break
            time.sleep(0.05)
        assert "another bundle" in row["fallback"], row["fallback"]  # its first reply
        assert not pool.edges[0].compatible and pool.pick() is None
        row, _ = client.frame(k + 1, _x(2), 0, False)  # skipped from now on
        assert row["fallback"] == "no healthy edge server"
        assert row["prediction"] == _local(bundle, 2)
        assert service.served == 0  # it never computed for a device of another bundle
    finally:
        pool.close()
        srv.stop(0)
        service.close()


class _Proxy(oip_service.GRPCInferenceServiceServicer):
    """A hostile edge: forwards to a real server, then breaks the reply with `mutate`."""

    def __init__(self, address: str):
        self.stub = oip.Stub(grpc.insecure_channel(address))
        self.mutate = None

    def ModelInfer(self, request, context):  # noqa: N802
        reply = self.stub.ModelInfer(request, metadata=META, timeout=30)
        if self.mutate and request.model_name != oip.PROBE:
            self.mutate(reply)
        return reply


def test_bad_replies_finish_the_frame_locally_and_a_lying_server_time_is_not_a_sample(bundle):
    service, srv, address = _serve(bundle)
    proxy = _Proxy(address)
    psrv = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    oip_service.add_GRPCInferenceServiceServicer_to_server(proxy, psrv)
    paddress = f"127.0.0.1:{psrv.add_insecure_port('127.0.0.1:0')}"
    psrv.start()
    # 0.5 Mbit/s: a frame's transfer (>= 784 B, >= 12.5 ms) outlasts the RTT and the 5 ms
    # floor, so an honest reply is a bandwidth sample (shorter transfers are RPC noise and
    # never are: coinfer.MIN_SAMPLE_S).
    client, pool, _ = _client(bundle, paddress, link="0.5")
    try:
        # A server claiming more compute than the whole call took: its answer is used,
        # its timing is not fed to the bandwidth estimate.
        proxy.mutate = lambda r: setattr(r.parameters[oip.SERVER_MS], "double_param", 9e5)
        est = client.estimator
        row, _ = client.frame(0, _x(0), 0, False)
        assert row["fallback"] is None and row["bw_sample"] is False
        assert client.estimator == est and row["prediction"] == _local(bundle, 0)
        proxy.mutate = None
        row, _ = client.frame(1, _x(1), 0, False)
        assert row["fallback"] is None and row["bw_sample"] is True
        assert client.estimator != est
        # Every malformed reply: the frame is finished on the device, the run goes on.
        for k, (name, mutate, _match) in enumerate(reply_mutations(), start=2):
            proxy.mutate = mutate
            pool.edges[0].compatible = True  # a digest mismatch retires the edge
            row, _ = client.frame(k, _x(k), 0, False)
            assert row["fallback"] and "bad reply" in row["fallback"], (name, row["fallback"])
            assert row["prediction"] == _local(bundle, k), name
    finally:
        pool.close()
        psrv.stop(0)
        srv.stop(0)
        service.close()


def test_tiny_and_infinite_bandwidths_and_deadlines_neither_hang_nor_crash(bundle, server):
    _, address = server
    for link, deadline in (("1e-9", 40.0), ("1e12", 1e300), ("1000", 1e-300), ("1e-9", 1e-300)):
        client, pool, _ = _client(bundle, address, deadline_ms=deadline)
        client.link = Link.parse(link)  # after start(): its probe would wait out 2 s
        row, _ = client.frame(0, _x(0), 0, False)
        assert row["prediction"] == _local(bundle, 0) and np.isfinite(row["measured_ms"])
        if link == "1e-9" and row["partition"] is not None:
            assert row["fallback"].startswith("link:")
        pool.close()
    pool = EdgePool([address], token=TOKEN, digest=bundle.digest)
    req = pool.request("edge_final_p00", np.zeros((1, 28, 28, 1), np.float32))
    for t in (float("nan"), float("inf"), -1.0, 0.0, 1e-300, 1e300):
        try:
            y, _, _ = pool.infer(pool.edges[0], req, (1, 10), t)
            assert y.shape == (1, 10)
        except Exception as e:  # only ever an EdgeFailure (a timeout), never anything else
            assert type(e).__name__ == "EdgeFailure" and "DEADLINE_EXCEEDED" in str(e), e
    pool.close()


# -- the load test command -----------------------------------------------------------------------


def test_edge_loadtest_two_seconds_answers_every_good_request_and_every_hostile_as_expected(
    bundle,
    tmp_path,
):
    out = tmp_path / "lt.json"
    proc = run_job("runtime.edge_loadtest", f"--bundle={bundle.path}", "--good=4", "--hostile=4",
                   "--seconds=2", "--deadline-ms=20000", "--call-timeout-s=0.5",
                   f"--json={out}", timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["good_requests"] > 0 and rep["all_good_ok"], rep["good_failures"]
    assert rep["hostile_unexpected"] == {}
    kinds = {k.split(" -> ")[0] for k in rep["hostile_outcomes"]}
    assert kinds == {"slow", "garbage", "wrong-token", "held"}, kinds
    assert rep["server_exit"].startswith("served ")
