"""Edgent end to end: partition export, sweep, profiles, fit, a real gRPC edge server, the client.

One smoke AlexNet bundle (5 exits, random weights: latency and wire behaviour
do not depend on training) is exported with partitions, profiled and fitted
once per test session; xdist workers share it through a file lock.
"""

from __future__ import annotations

import concurrent.futures
import copy
import fcntl
import hashlib
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

from runtime import Bundle, BundleError, data, encoding, oip, planner
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


def _readers(part) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in part["exits"]:
        for p in e["edge"]:
            out.setdefault(p, set()).add(e["name"])
    return out


def test_exported_partitions_carry_every_cut_encoding_with_its_measured_accuracy(bundle):
    part = bundle.manifest["partitions"]
    readers = _readers(part)
    assert part["encoding_eval"]["calibration_frames"] > 0
    for cut, act in part["activations"].items():
        if cut not in readers:
            assert "encodings" not in act
            continue
        encs = act["encodings"]
        assert [e["name"] for e in encs] == ["float32", "float16", "int8"]
        assert [e["bytes"] for e in encs] == [act["bytes"], act["bytes"] // 2, act["bytes"] // 4]
        assert all(set(e["exits"]) == readers[cut] for e in encs)
        assert all(x["agreement"] == 1.0 for x in encs[0]["exits"].values())
    # Measured as documented: int8 calibrated on the device prefix's activations of the
    # training frames; device -> int8 -> edge on the validation frames, against the labels.
    m = bundle.manifest
    n_cal, n_val = part["encoding_eval"]["calibration_frames"], part["encoding_eval"][
        "validation_frames"]  # fmt: skip
    train = data.load(f"{m['data']['name']}:train", m)
    val = data.load(f"{m['data']['name']}:val", m)
    model = bundle.load_partitions()
    dev, edge = model.signature("dev_p04"), model.signature("edge_7_p04")
    cal = [dev(x[None]) for x in train.x[:n_cal]]
    int8 = encoding.calibrate("int8", cal)
    stored = part["activations"]["4"]["encodings"][2]
    assert (stored["scale"], stored["zero_point"]) == (pytest.approx(int8.scale), int8.zero_point)
    acts = [dev(x[None]) for x in val.x[:n_val]]
    ref = np.array([edge(a).argmax() for a in acts])
    got = np.array([edge(int8.roundtrip(a)).argmax() for a in acts])
    assert stored["exits"]["exit_7"]["accuracy"] == pytest.approx(np.mean(got == val.y[:n_val]))
    assert stored["exits"]["exit_7"]["agreement"] == pytest.approx(np.mean(got == ref))


def test_encoding_effect_is_measured_a_miscalibrated_int8_loses_agreement(bundle):
    from export import partitions as partitions_lib  # lazy: imports the converter (TF)

    part = copy.deepcopy(bundle.manifest["partitions"])
    frames = data.load("mnist5k:test", bundle.manifest)
    # int8 calibrated on frames 50x too dark saturates on real ones: the loss must show.
    partitions_lib.measure_encodings(
        bundle.load_partitions(), part, frames.x[:20] * 0.02, frames.x[20:], frames.y[20:]
    )
    int8 = [x["agreement"] for a in part["activations"].values() for e in a.get("encodings", [])
            if e["name"] == "int8" for x in e["exits"].values()]  # fmt: skip
    assert min(int8) < 0.9
    f32 = [x["agreement"] for a in part["activations"].values() for e in a.get("encodings", [])
           if e["name"] == "float32" for x in e["exits"].values()]  # fmt: skip
    assert set(f32) == {1.0}


def test_planner_options_enumerate_each_cut_encoding_with_its_bytes_and_accuracy(bundle):
    m = bundle.manifest
    opts = planner.options(m)
    part = m["partitions"]
    acc = {e["name"]: e["val_accuracy"] for e in m["exits"]}
    remote = [o for o in opts if o.remote]
    assert len(remote) == 3 * sum(len(e["edge"]) for e in part["exits"])
    for o in remote:
        entries = {e["name"]: e for e in part["activations"][str(o.partition)]["encodings"]}
        assert o.up_bytes == entries[o.encoding.name]["bytes"]
        eff, ref = entries[o.encoding.name]["exits"][o.exit], entries["float32"]["exits"][o.exit]
        # The exit's accuracy adjusted by the measured effect (a gain counts as none).
        want = acc[o.exit] + min(0.0, eff["accuracy"] - ref["accuracy"])
        assert o.accuracy == pytest.approx(want)
        assert o.agreement == eff["agreement"]
    # A bundle exported before encodings: float32 cuts only, its bytes as recorded.
    old = copy.deepcopy(m)
    for a in old["partitions"]["activations"].values():
        a.pop("encodings", None)
    del old["partitions"]["encoding_eval"]
    old_opts = planner.options(old)
    assert {o.encoding.name for o in old_opts} == {"float32"}
    assert len(old_opts) == len(opts) - 2 * len(remote) // 3


def _encoding_mutations(part) -> list[tuple[str, object]]:
    """(what, edit of the partitions section) that verification must refuse: generated per
    field of an encodings entry, its values' domains and the section's invariants."""
    cut = next(c for c, a in part["activations"].items() if "encodings" in a)
    other = next(c for c in part["activations"] if c not in _readers(part))
    exit_name = next(iter(part["activations"][cut]["encodings"][0]["exits"]))

    def entry(j):
        return lambda p: p["activations"][cut]["encodings"][j]

    cases = [
        ("unknown key", lambda p: entry(0)(p).update(colour="red")),
        ("unknown activation key", lambda p: p["activations"][cut].update(note=1)),
        ("unknown encoding", lambda p: entry(1)(p).update(name="int4")),
        ("name not a string", lambda p: entry(1)(p).update(name=16)),
        ("float32 not first", lambda p: p["activations"][cut]["encodings"].reverse()),
        ("listed twice", lambda p: p["activations"][cut]["encodings"].append(entry(1)(p))),
        ("empty list", lambda p: p["activations"][cut].update(encodings=[])),
        ("not a list", lambda p: p["activations"][cut].update(encodings={"name": "float32"})),
        ("int8 without scale", lambda p: entry(2)(p).pop("scale")),
        ("float16 with a scale", lambda p: entry(1)(p).update(scale=0.5)),
        ("missing exits", lambda p: entry(0)(p).pop("exits")),
        ("an exit missing", lambda p: entry(0)(p)["exits"].pop(exit_name)),
        ("an unknown exit", lambda p: entry(0)(p)["exits"].update(exit_99=entry(0)(p)["exits"][
            exit_name])),
        ("effect key unknown", lambda p: entry(2)(p)["exits"][exit_name].update(loss=0.1)),
        ("effect key missing", lambda p: entry(2)(p)["exits"][exit_name].pop("agreement")),
        ("encodings at a cut no edge reads", lambda p: p["activations"][other].update(
            encodings=p["activations"][cut]["encodings"])),
        ("no encoding_eval", lambda p: p.pop("encoding_eval")),
        ("encoding_eval extra", lambda p: p["encoding_eval"].update(seed=1)),
        ("encoding_eval zero", lambda p: p["encoding_eval"].update(validation_frames=0)),
    ]  # fmt: skip
    for field, values in (
        ("scale", [0, -1.0, "1", None, True, -0.0]),
        ("zero_point", [-129, 128, 1.5, "0", None, True]),
        ("bytes", [-1, 0, 1.5, "4", None, 10**30]),
    ):
        for v in values:
            cases.append(
                (f"int8 {field}={v!r}", lambda p, f=field, v=v: entry(2)(p).update({f: v}))
            )
    for key in ("accuracy", "agreement"):
        for v in (-0.01, 1.01, "0.5", None, True):
            cases.append((f"{key}={v!r}", lambda p, k=key, v=v: entry(1)(p)["exits"][
                exit_name].update({k: v})))  # fmt: skip
    cases.append(("wrong float16 bytes", lambda p: entry(1)(p).update(bytes=entry(0)(p)["bytes"])))
    return cases


def test_manifest_encodings_are_verified_and_every_bad_one_is_one_bundle_error(bundle, tmp_path):
    part = bundle.manifest["partitions"]
    refused = 0
    for what, edit in _encoding_mutations(part):
        d = tmp_path / f"b{refused}"
        shutil.copytree(bundle.path, d)
        m = json.loads((d / "manifest.json").read_text())
        edit(m["partitions"])
        _write_manifest(str(d), m)
        with pytest.raises(BundleError) as e:
            Bundle.from_dir(str(d))
        msg = str(e.value)
        assert "\n" not in msg and ("partitions" in msg or "beyond 2**53" in msg), (what, msg)
        refused += 1
        shutil.rmtree(d)
    assert refused >= 40
    # Without any encodings (a bundle from before them) it loads: float32 only.
    d = tmp_path / "old"
    shutil.copytree(bundle.path, d)
    m = json.loads((d / "manifest.json").read_text())
    for a in m["partitions"]["activations"].values():
        a.pop("encodings", None)
    del m["partitions"]["encoding_eval"]
    _write_manifest(str(d), m)
    assert Bundle.from_dir(str(d)).manifest["partitions"]


def _write_manifest(path: str, m: dict) -> None:
    raw = json.dumps(m).encode()
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(raw)
    with open(os.path.join(path, "manifest.sha256"), "w") as f:
        f.write(hashlib.sha256(raw).hexdigest() + "\n")


def test_planner_cli_shows_the_encoding_and_refuses_an_unknown_one(bundle):
    proc = run_job("runtime.planner", f"--bundle={bundle.path}", "--deadline-ms=50",
                   "--bandwidths=0.05,1000")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "encoding" in proc.stdout.splitlines()[0] and "accuracy" in proc.stdout.splitlines()[0]
    for bad in ("--encodings=int4", "--encodings=float32,bf16", "--encodings=,"):
        proc = run_job("runtime.planner", f"--bundle={bundle.path}", "--deadline-ms=50", bad)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), lines
        assert "unknown encoding" in lines[0]


def test_emulation_check_reports_every_signature_against_the_slowdown(bundle, tmp_path):
    out = tmp_path / "emu.json"
    proc = run_job("runtime.emulation_check", f"--bundle={bundle.path}", "--slowdown=8",
                   "--rounds=2", "--min-ms=0.05", f"--json={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert [r["signature"] for r in rep["signatures"]] == list(
        bundle.manifest["partitions"]["signatures"]
    )
    assert rep["device"] == "local:threads=1:slowdown=8:clock=virtual"
    for r in rep["signatures"]:
        assert (
            r["edge_ms"] > 0
            and r["device_ms"] > 0
            and r["within"] == (abs(r["ratio"] / 8 - 1) <= 0.1)
        )
    assert rep["summary"]["process_over_thread_cpu"] > 0
    assert "within 10%" in proc.stdout
    bad = run_job("runtime.emulation_check", f"--bundle={bundle.path}", "--slowdown=1")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1


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
    # Predictions come from per-layer regressions of sub-millisecond layers (intercepts
    # dominate), so only their order is asserted; the measured 2x is checked above.
    assert full[None].device_ms > full[0].edge_ms


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
    # A call whose deadline passes before its body is read is cut by the server's watchdog,
    # which grpc's threaded server can only cancel (runtime.edge_server: CANCELLED); any
    # other code (UNKNOWN, INTERNAL, UNAVAILABLE) would be an unclean end.
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert "DEADLINE_EXCEEDED" in codes
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
    # Edge-only sends the frame as a client would: its pixels (int8 at scale 1/255, lossless
    # on validation), not the float32 tensor (runtime.planner.baseline_encodings).
    assert all(r["plan"] == "final@edge-only+int8" and r["edge"] == address for r in rows)
    for key in ("predicted_ms", "measured_ms", "exit", "correct", "network_ms", "edge_ms"):
        assert key in rows[0]
    # The emulated 5 Mbps link: each frame carries >= 784 bytes up, so >= 1.25 ms of transfer.
    assert min(r["network_ms"] for r in rows) >= 784 * 8 / 5e6 * 1e3
    # The client's bandwidth estimate comes from real transfers and lands near 5 Mbps
    # (at most 2x over: it subtracts a measured RTT, which moves with machine load).
    assert 1.5 < rows[-1]["est_mbps"] <= 10
    s = rep["summary"]
    # Frames answered by the edge are exactly those the local model would answer.
    assert s["frames"] == 30 and 0 <= s["accuracy"] <= 1


def test_coinfer_learns_a_device_slower_than_profiled_and_plans_with_it(bundle, server, tmp_path):
    # The bundle was profiled on a device slowed 5x; the same device, and one slowed 20x: the
    # client learns each one's factor (measured / profiled device time) from its own calls.
    _, address = server
    reps = {}
    for name, extra in (("5", ()), ("20", ()), ("static", ("--static-compute",))):
        path = tmp_path / f"{name}.json"
        slowdown = "5" if name == "5" else "20"
        proc = _coinfer(bundle.path, address, "--token=s3cret", f"--json={path}",
                        "--policy=device-only", f"--device=local:threads=1:slowdown={slowdown}",
                        *extra, frames=20)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        reps[name] = json.loads(path.read_text())
    same, slow = reps["5"]["compute_drift"], reps["20"]["compute_drift"]
    assert same["samples"][0] == slow["samples"][0] == 20
    assert same["edge"] == 1.0 and same["samples"][1] == 0  # device-only: no edge calls
    assert slow["device"] > 1.3 * same["device"], (same, slow)
    for rep in (reps["5"], reps["20"]):
        rows = rep["frames"]
        assert rows[0]["device_factor"] == 1.0  # each frame logs the factor it was planned with
        # The factor is what the frames showed: measured over the profile's prediction
        # (device-only: predicted = factor x profiled device time).
        ratios = [r["device_ms"] / (r["predicted_ms"] / r["device_factor"]) for r in rows[10:]]
        want = min(np.median(ratios), planner.ComputeDrift.hi)  # (the clamp)
        assert rep["compute_drift"]["device"] == pytest.approx(want, rel=0.3)
    # Predictions follow the learned factor; with --static-compute they stay the profile's.
    static = reps["static"]
    assert static["compute_drift"] is None and "device_factor" not in static["frames"][0]
    err = [np.mean([abs(r["error_ms"]) for r in rep["frames"][10:]])
           for rep in (reps["20"], static)]  # fmt: skip
    assert err[0] < err[1], err


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
    # 1 Mbit/s: every frame's transfer (>= 6 ms) is a bandwidth sample, so no probe runs
    # between frames (a probe would find the dead server first: no frame would fall back).
    proc = _coinfer(bundle.path, edges, f"--json={out}", "--policy=edge-only", "--bandwidth=1",
                    frames=120)  # fmt: skip
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


def test_coinfer_restricted_to_one_exit_runs_only_that_exit(bundle, server, tmp_path):
    _, address = server
    side = bundle.manifest["partitions"]["exits"][0]["name"]
    out = tmp_path / "c.json"
    proc = _coinfer(bundle.path, address, "--token=s3cret", f"--json={out}",
                    "--policy=device-only", f"--exit={side}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["frames"]
    assert {r["plan"] for r in rows} == {f"{side}@device-only"}
    proc = _coinfer(bundle.path, address, "--token=s3cret", "--exit=exit_99")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:"), proc.stderr
    assert "exit_99" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


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
