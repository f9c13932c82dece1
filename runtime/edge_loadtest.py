"""Load test: the edge server under well-behaved and hostile peers at once.

  python -m runtime.edge_loadtest --bundle=BUNDLE [--good=16] [--hostile=8] [--seconds=60]
      [--deadline-ms=1000] [--workers=2] [--max-pending=64] [--call-timeout-s=2]
      [--slow-calls=4] [--json=OUT]

Starts ``runtime.edge_server`` (a subprocess on 127.0.0.1 with a random
token in a private temp file) and, for ``--seconds``, runs:

* ``--good`` clients (threads here, each on its own channel, through the
  protocol's generated stub): ModelInfer on a random edge signature with a
  random input in a random encoding (float32 / float16 / int8) drawn from a
  pool whose answers were computed locally first (the signature run on the
  decoded input). A good request counts as answered only if its reply is for
  it, carries the bundle digest, equals the local answer (atol 1e-5) and
  arrived within ``--deadline-ms`` (also the RPC deadline);
* ``--hostile`` peers (a separate process, so their CPU use does not take the
  good clients' interpreter lock), kinds in turn: ``slow`` (right token,
  headers, then never a body: ``--slow-calls`` such calls held at once),
  ``garbage`` (right token, every case of `hostile_cases`: not protobuf,
  truncated, nested past the recursion limit, too many or too long
  parameters and headers, wrong model, shape, datatype, encoding, byte count,
  NaN, another bundle, oversized), ``wrong-token`` (valid requests, wrong or
  no token) and ``held`` (no token, headers, never a body). Each hostile call
  must end with the status its case expects; anything else is "unexpected".

Prints one summary line and writes the report (``--json``): good requests,
answered correctly within the deadline, failures by kind, latency
percentiles, hostile calls by kind and outcome, the server's own counts, and
the machine's load average before and after.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from open_inference.grpc import protocol as pb

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import oip
from runtime.bundle import Bundle
from runtime.encoding import ENCODINGS, Encoding, calibrate

KINDS = ("slow", "garbage", "wrong-token", "held")
INFER = f"/{oip.SERVICE}/ModelInfer"
OK = "OK"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def nested_groups(depth: int, field: int = 100) -> bytes:
    """`depth` nested protobuf groups of an unknown field (recursion past any parser limit)."""
    return _varint(field << 3 | 3) * depth + _varint(field << 3 | 4) * depth


def hostile_cases(
    model: str, shape: Sequence[int], digest: str, max_message_bytes: int, seed: int = 0
) -> list[tuple[str, str, bytes, tuple, frozenset[str]]]:
    """Bad calls and the status each must get: ``(name, method, body, metadata, codes)``.

    `metadata` is added to the caller's (token) metadata. Generated from one valid
    request of `model` (input `shape`) so every field is broken in turn.
    """
    rng = np.random.default_rng(seed)
    x = rng.random(shape, np.float32)
    INV, NF = frozenset({"INVALID_ARGUMENT"}), frozenset({"NOT_FOUND"})  # noqa: N806

    def req(
        mutate: Callable[[pb.ModelInferRequest], None] | None = None,
        encoding: Encoding | None = None,
        tensor=x,
    ):
        r = oip.infer_request(model, tensor, encoding, request_id="1", digest=digest)
        if mutate:
            mutate(r)
        return r.SerializeToString()

    good = req()
    cases: list[tuple[str, str, bytes, tuple, frozenset[str]]] = []

    def add(name, body, codes=INV, metadata=(), method="ModelInfer"):
        if len(body) > max_message_bytes:  # gRPC refuses it before the server sees it
            codes = frozenset({"RESOURCE_EXHAUSTED"})
        cases.append((name, method, body, tuple(metadata), codes))

    for n in (1, 7, 100, 5000):
        add(f"random {n} bytes", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    for cut in (1, 10, len(good) // 2, len(good) - 1):
        add(f"truncated at {cut}", good[:cut])
    for depth in (101, 1000, 100_000):
        add(f"nested {depth} deep", good + nested_groups(depth))
        add(f"nested {depth} deep alone", nested_groups(depth))
    for n in (oip.MAX_PARAMS + 1, 1000):
        add(f"{n} request parameters",
            req(lambda r, n=n: [r.parameters[f"k{i}"].SetInParent()
                                for i in range(n)]))  # fmt: skip
        add(f"{n} input parameters",
            req(lambda r, n=n: [r.inputs[0].parameters[f"k{i}"].SetInParent()
                                for i in range(n)]))  # fmt: skip
    for size in (oip.MAX_KEY + 1, 100_000):
        add(f"parameter key of {size} bytes",
            req(lambda r, s=size: r.parameters["k" * s].SetInParent()))  # fmt: skip
    for size in (oip.MAX_STRING + 1, 1_000_000):
        add(f"string parameter of {size} bytes",
            req(lambda r, s=size: setattr(r.parameters["note"], "string_param",
                                          "x" * s)))  # fmt: skip
        add(f"id of {size} bytes", req(lambda r, s=size: setattr(r, "id", "i" * s)))
        add(f"model name of {size} bytes",
            req(lambda r, s=size: setattr(r, "model_name", "m" * s)))  # fmt: skip
    add("digest not a string", req(lambda r: setattr(r.parameters[oip.DIGEST], "int64_param", 5)))
    add("digest empty", req(lambda r: r.parameters[oip.DIGEST].Clear()))
    add("unknown model", req(lambda r: setattr(r, "model_name", "full")), NF)
    add("probe of another model", req(lambda r: setattr(r, "model_name", oip.PROBE)))
    add("unknown version", req(lambda r: setattr(r, "model_version", "7")), NF)
    other = req(lambda r: setattr(r.parameters[oip.DIGEST], "string_param", "0" * 64))
    add("another bundle", other, frozenset({"FAILED_PRECONDITION"}))
    for dt in ("FP64", "BYTES", "INT32", "", "fp32"):
        add(f"datatype {dt!r}", req(lambda r, dt=dt: setattr(r.inputs[0], "datatype", dt)))
    int8 = calibrate("int8", [x])

    def params(**kw):
        def mutate(r):
            for k, v in kw.items():
                p = r.inputs[0].parameters[k]
                if isinstance(v, str):
                    p.string_param = v
                elif isinstance(v, bool):
                    p.bool_param = v
                elif isinstance(v, int):
                    p.int64_param = v
                else:
                    p.double_param = v

        return mutate  # fmt: skip

    for name, kw in (
        ("int8 scale 0", {"scale": 0.0}), ("int8 scale -1", {"scale": -1.0}),
        ("int8 scale nan", {"scale": float("nan")}), ("int8 scale inf", {"scale": float("inf")}),
        ("int8 scale as string", {"scale": "0.1"}), ("int8 zero point 128", {"zero_point": 128}),
        ("int8 zero point -129", {"zero_point": -129}), ("int8 zero point bool",
                                                         {"zero_point": True}),
        ("int8 zero point float", {"zero_point": 1.5}),
    ):  # fmt: skip
        add(name, req(params(**kw), int8))
    add("int8 without scale", req(lambda r: r.inputs[0].parameters.pop(oip.SCALE), int8))
    add("input renamed", req(lambda r: setattr(r.inputs[0], "name", "x")))
    for bad_shape in ([], [0], [-1], [1] * 7, [*shape, 1], [2**40]):
        add(f"shape {bad_shape}",
            req(lambda r, s=bad_shape: (r.inputs[0].ClearField("shape"),
                                        r.inputs[0].shape.extend(s))))  # fmt: skip
    add("one byte short", req(lambda r: r.raw_input_contents.__setitem__(
        0, r.raw_input_contents[0][:-1])))  # fmt: skip
    add("one byte over", req(lambda r: r.raw_input_contents.__setitem__(
        0, r.raw_input_contents[0] + b"\0")))  # fmt: skip
    add("two inputs",
        req(lambda r: (r.inputs.add(name="input", datatype="FP32", shape=shape),
                       r.raw_input_contents.append(r.raw_input_contents[0]))))  # fmt: skip
    add("contents instead of raw", req(lambda r: (r.ClearField("raw_input_contents"),
                                                  r.inputs[0].contents.fp32_contents.extend(
                                                      x.ravel().tolist()))))  # fmt: skip
    add("wrong output requested", req(lambda r: setattr(r.outputs[0], "name", "activation")))
    nan = x.copy()
    nan.flat[0] = np.nan
    add("NaN input", req(tensor=nan))
    add("float16 overflow to inf", req(lambda r: r.raw_input_contents.__setitem__(
        0, np.full(shape, np.inf, np.float16).tobytes()), Encoding("float16")))  # fmt: skip
    add("oversized message", good + bytes(max_message_bytes),
        frozenset({"RESOURCE_EXHAUSTED"}))  # fmt: skip
    add("33 headers", good, metadata=[(f"x-h{i}", "v") for i in range(oip.MAX_METADATA_ENTRIES)])
    add("9 kB header", good, metadata=[("x-big", "v" * (oip.MAX_METADATA_BYTES + 1024))])
    # Beyond gRPC's own limit (4x ours) the transport refuses the headers itself.
    add("100 kB header", good, metadata=[("x-big", "v" * 100_000)],
        codes=frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL",
                         "UNAVAILABLE"}))  # fmt: skip
    add("not a ModelMetadata request", b"\xff\xff\xff", method="ModelMetadata")
    add("unknown method", good, frozenset({"UNIMPLEMENTED"}), method="Explode")
    return cases


# -- good clients ---------------------------------------------------------------------------------


def _expected(bundle: Bundle, per_model: int, seed: int) -> list[tuple]:
    """(model, float32 input, encoding, answer) drawn from every edge signature."""
    part = bundle.manifest["partitions"]
    sigs = sorted({s for e in part["exits"] for s in e["edge"].values()})
    model = bundle.load_partitions()
    rng = np.random.default_rng(seed)
    out = []
    for name in sigs:
        sig = model.signature(name)
        for k in range(per_model):
            x = rng.standard_normal(sig.input_shape).astype(np.float32)
            name_enc = ENCODINGS[k % len(ENCODINGS)]
            enc = calibrate(name_enc, [x])
            want = np.array(sig(enc.roundtrip(x)), np.float32, copy=True)
            out.append((name, x, enc, want))
    return out


def _good_client(address, token, digest, pool, deadline_s, until, seed, results) -> None:
    ch = grpc.insecure_channel(address)
    stub = oip.Stub(ch)
    md = oip.bearer(token)
    rng = np.random.default_rng(seed)
    lat, fails, n = [], collections.Counter(), 0
    while time.monotonic() < until:
        name, x, enc, want = pool[int(rng.integers(len(pool)))]
        rid = f"{seed}-{n}"
        n += 1
        req = oip.infer_request(name, x, enc, request_id=rid, digest=digest)
        t0 = time.perf_counter()
        try:
            reply = stub.ModelInfer(req, timeout=deadline_s, metadata=md)
            dt = time.perf_counter() - t0
            y, _ = oip.read_output(reply, model=name, request_id=rid, digest=digest,
                                   shape=want.shape)  # fmt: skip
            if not np.allclose(y, want, atol=1e-5, rtol=0):
                fails["wrong answer"] += 1
            elif dt > deadline_s:
                fails["late"] += 1
            lat.append(dt * 1e3)
        except grpc.RpcError as e:
            fails[e.code().name] += 1
        except oip.ProtocolError as e:
            fails[f"bad reply: {e}"] += 1
    ch.close()
    results.put((n, lat, fails))


# -- hostile peers (run in their own process) -----------------------------------------------------


def _never(stop: threading.Event, done: threading.Event):
    """A request stream that sends nothing until the call or the run ends."""
    while not (stop.wait(0.05) or done.is_set()):
        pass
    return
    yield b""


def _hold(kind, ch, metadata, stop, until, calls: int, expect: str, counts, lock) -> None:
    """Keeps `calls` bodiless calls open; each must be ended by the server with `expect`."""
    call = ch.stream_unary(INFER)
    while time.monotonic() < until:
        futures = []
        for _ in range(calls):
            done = threading.Event()
            f = call.future(_never(stop, done), metadata=metadata,
                            timeout=max(1.0, until - time.monotonic() + 30))  # fmt: skip
            f.add_done_callback(lambda _f, done=done: done.set())
            futures.append(f)
        for f in futures:
            try:
                f.result()
                code = OK
            except grpc.RpcError as e:
                code = e.code().name
            if stop.is_set() and code != expect:
                code = "ended by the run's end"
            with lock:
                ok = code in (expect, "ended by the run's end")
                counts[(kind if ok else f"unexpected {kind}", code)] += 1


def _hostile_peer(kind, address, token, digest, model, shape, max_msg, until, stop, slow_calls,
                  counts, lock, seed) -> None:  # fmt: skip
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                 ("grpc.max_metadata_size", 1 << 20)])  # fmt: skip
    md = oip.bearer(token)
    if kind == "slow":
        _hold(kind, ch, md, stop, until, slow_calls, "CANCELLED", counts, lock)
    elif kind == "held":
        _hold(kind, ch, (), stop, until, slow_calls, "UNAUTHENTICATED", counts, lock)
    else:
        raw = {m: ch.unary_unary(f"/{oip.SERVICE}/{m}") for m in (*oip.METHODS, "Explode")}
        if kind == "garbage":
            cases = hostile_cases(model, shape, digest, max_msg, seed)
        else:
            body = oip.infer_request(model, np.zeros(shape, np.float32), request_id="1",
                                     digest=digest).SerializeToString()  # fmt: skip
            wrong = [(), oip.bearer("x"), oip.bearer(token + "x"), oip.bearer(""),
                     (("authorization", token),)]  # fmt: skip
            cases = [(f"token {i}", "ModelInfer", body, w, frozenset({"UNAUTHENTICATED"}))
                     for i, w in enumerate(wrong)]  # fmt: skip
            md = ()
        k = 0
        while time.monotonic() < until:
            name, method, body, extra, codes = cases[k % len(cases)]
            k += 1
            try:
                raw[method](body, metadata=(*md, *extra), timeout=10.0)
                code = OK
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                counts[(kind if code in codes else f"unexpected {kind}: {name}", code)] += 1
    ch.close()


def _hostile_main(kinds, address, token, digest, model, shape, max_msg, seconds, slow_calls,
                  out) -> None:  # fmt: skip
    until = time.monotonic() + seconds
    stop = threading.Event()
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    threads = [threading.Thread(target=_hostile_peer, args=(
        kind, address, token, digest, model, shape, max_msg, until, stop, slow_calls, counts,
        lock, i)) for i, kind in enumerate(kinds)]  # fmt: skip
    for t in threads:
        t.start()
    time.sleep(max(0.0, until - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=60)
    out.put({f"{a} -> {b}": v for (a, b), v in sorted(counts.items())})


# -- the run --------------------------------------------------------------------------------------


def _start_server(bundle: str, token_file: str, args, log) -> tuple[subprocess.Popen, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.edge_server", f"--bundle={bundle}", "--port=0",
         f"--token-file={token_file}", f"--workers={args.workers}",
         f"--max-pending={args.max_pending}", f"--call-timeout-s={args.call_timeout_s}",
         f"--max-message-bytes={args.max_message_bytes}"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.wait(timeout=30)
        raise RuntimeError(f"edge server did not start (exit {proc.returncode})")
    return proc, line.split("listening on ")[1].split()[0]


def run(args) -> dict:
    """One load test (the flags of ``python -m runtime.edge_loadtest``); returns the report."""
    bundle = Bundle.from_dir(args.bundle)
    if bundle.manifest.get("partitions") is None:
        raise ValueError(f"bundle {args.bundle} has no partitions (export it with --partitions)")
    pool = _expected(bundle, per_model=3, seed=0)
    first_model, first_x = pool[0][0], pool[0][1]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edge_loadtest_") as tmp:
        token = secrets.token_hex(16)
        token_file = os.path.join(tmp, "token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(token + "\n")
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "w") as log:
            server, address = _start_server(args.bundle, token_file, args, log)
        try:
            ctx = multiprocessing.get_context("spawn")
            hostile_out = ctx.Queue()
            kinds = [KINDS[i % len(KINDS)] for i in range(args.hostile)]
            hostile = ctx.Process(target=_hostile_main, args=(
                kinds, address, token, bundle.digest, first_model, first_x.shape,
                args.max_message_bytes, args.seconds, args.slow_calls, hostile_out))  # fmt: skip
            hostile.start()
            time.sleep(0.5 if args.hostile else 0.0)  # hostile peers first: they are there already
            results: queue.Queue = queue.Queue()
            until = time.monotonic() + args.seconds
            threads = [threading.Thread(target=_good_client, args=(
                address, token, bundle.digest, pool, args.deadline_ms / 1e3, until, i, results))
                for i in range(args.good)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            hostile_counts = hostile_out.get(timeout=args.seconds + 120)
            hostile.join(timeout=60)
        finally:
            server.terminate()
            out, _ = server.communicate(timeout=60)
        with open(log_path) as f:
            log_lines = f.read().splitlines()
    n, lat, fails = 0, [], collections.Counter()
    while not results.empty():
        k, l_ms, f = results.get()
        n, lat, fails = n + k, lat + l_ms, fails + f
    ok = n - sum(fails.values())
    lat_arr = np.array(lat) if lat else np.zeros(1)
    unexpected = {k: v for k, v in hostile_counts.items() if k.startswith("unexpected")}
    return {
        "bundle": os.path.abspath(args.bundle),
        "settings": {
            k: getattr(args, k)
            for k in (
                "good",
                "hostile",
                "seconds",
                "deadline_ms",
                "workers",
                "max_pending",
                "call_timeout_s",
                "slow_calls",
                "max_message_bytes",
            )
        },  # fmt: skip
        "hostile_kinds": [KINDS[i % len(KINDS)] for i in range(args.hostile)],
        "good_requests": n,
        "good_answered_in_time": ok,
        "good_failures": dict(fails),
        "all_good_ok": n > 0 and ok == n,
        "good_per_s": n / args.seconds,
        "latency_ms": {
            "p50": float(np.percentile(lat_arr, 50)),
            "p90": float(np.percentile(lat_arr, 90)),
            "p99": float(np.percentile(lat_arr, 99)),
            "max": float(lat_arr.max()),
        },  # fmt: skip
        "hostile_calls": sum(hostile_counts.values()),
        "hostile_outcomes": hostile_counts,
        "hostile_unexpected": unexpected,
        "server_exit": out.strip().splitlines()[-1] if out.strip() else "",
        "server_log_lines": len(log_lines),
        "server_log_sample": log_lines[:5],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.edge_loadtest`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m runtime.edge_loadtest",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--good", type=args_lib.count(1, 256), default=16)
    p.add_argument("--hostile", type=args_lib.count(0, 256), default=8)
    p.add_argument("--seconds", type=args_lib.real(0.5, 3600.0), default=60.0)
    p.add_argument("--deadline-ms", type=args_lib.real(1.0, 600_000.0), default=1000.0,
                   help="each good request's deadline")  # fmt: skip
    p.add_argument("--workers", type=args_lib.count(1, 64), default=2, help="server interpreters")
    p.add_argument("--max-pending", type=args_lib.count(1, 4096), default=64)
    p.add_argument("--call-timeout-s", type=args_lib.real(0.01, 3600.0), default=2.0)
    p.add_argument("--slow-calls", type=args_lib.count(1, 64), default=4,
                   help="bodiless calls each slow / held peer keeps open")  # fmt: skip
    p.add_argument("--max-message-bytes", type=args_lib.count(1024, 1 << 30), default=4 << 20)
    p.add_argument("--json", default=None, type=args_lib.output_file())
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    rep = run(args)
    if args.json:
        write_json_atomic(args.json, rep)
    lat = rep["latency_ms"]
    print(
        f"good: {rep['good_requests']} requests from {args.good} clients in {args.seconds:g} s, "
        f"{rep['good_answered_in_time']} answered correctly within {args.deadline_ms:g} ms "
        f"(failures {rep['good_failures'] or 'none'}), p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} "
        f"max {lat['max']:.2f} ms; hostile: {rep['hostile_calls']} calls from {args.hostile} "
        f"peers, unexpected outcomes {rep['hostile_unexpected'] or 'none'}; server: "
        f"{rep['server_exit']}; load {rep['load_average_before'][0]:.2f} -> "
        f"{rep['load_average_after'][0]:.2f} on {rep['cpus']} CPUs",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
