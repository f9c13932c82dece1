"""The edge side of Edgent co-inference: an Open Inference Protocol (gRPC) server.

  python -m runtime.edge_server --bundle=BUNDLE --port=P (--token=S | --token-file=F | --insecure)
      [--host=127.0.0.1] [--workers=4] [--threads=1] [--max-pending=64] [--call-timeout-s=30]
      [--tls-cert=CRT --tls-key=KEY] [--max-message-bytes=4194304]

Serves ``inference.GRPCInferenceService`` (KServe v2 / Triton; `runtime.oip`
has the models, parameter names and limits): ServerLive, ServerReady,
ServerMetadata, ModelReady, ModelMetadata and ModelInfer, where each edge
partition signature of the bundle is a model. ModelInfer decodes the cut
tensor from its encoding (``FP32`` / ``FP16`` / ``INT8`` + scale and zero
point, `runtime.encoding`), runs the float32 signature and replies with the
logits, the bundle digest and the compute time. Any stock Triton / KServe
gRPC client can call it (README, "Calling the edge server").

Hostile and unlucky peers (each class has generated tests):

* **authenticate before work**: the token (``authorization: Bearer T``) and
  the header limits are checked when a call's headers arrive, in gRPC's own
  thread, before its body is read: a refused call never waits for its body
  and never holds a worker. Only ServerLive/ServerReady answer without a token.
* **bounded pending calls**: at most ``--max-pending`` calls in progress (gRPC
  answers RESOURCE_EXHAUSTED beyond); each has its own thread, and
  interpreters are a separate pool of ``--workers``, so calls waiting for a
  body never hold an interpreter. (A refused call counts against the bound
  for the microseconds its refusal takes: a burst of thousands at once can
  briefly fill it; a token holder can fill it for ``--call-timeout-s``.)
* **server-side deadlines**: a call's body must arrive, and an interpreter be
  free, within the client's deadline and at most ``--call-timeout-s``;
  otherwise the call is cancelled (no body) or gets DEADLINE_EXCEEDED.
* **bad messages** (not protobuf, nested beyond protobuf's recursion limit,
  too many or too long parameters / headers, wrong model, shape, datatype,
  encoding or byte count, NaN): INVALID_ARGUMENT (or NOT_FOUND for an unknown
  model) with one log line (at most 20 a second; the rest are counted).
  Messages above ``--max-message-bytes`` are refused by gRPC itself
  (RESOURCE_EXHAUSTED). Nothing is unpickled.
* a request naming another bundle digest: FAILED_PRECONDITION.
* **no silent insecurity**: no token, an empty one or an empty token file
  refuses to start unless ``--insecure`` is given; the start line says
  whether authentication is on. **The port is never shared** (SO_REUSEPORT
  off): a second server on a bound port fails with one error line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import hmac
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

import grpc
import numpy as np
from open_inference.grpc import protocol as pb

from runtime import args as args_lib
from runtime import oip
from runtime.bundle import Bundle, BundleError
from runtime.encoding import ENCODINGS
from runtime.lite import Model

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
DEFAULT_MAX_PENDING = 64
DEFAULT_CALL_TIMEOUT_S = 30.0
LOG = logging.getLogger("runtime.edge_server")


class _RateLog:
    """Warning lines, at most `per_s` a second; the excess is counted and reported once."""

    def __init__(self, per_s: int = 20):
        self.per_s, self.window, self.lines, self.suppressed = per_s, 0.0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self.window >= 1.0:
                if self.suppressed:
                    LOG.warning("(%d more refusals not logged)", self.suppressed)
                self.window, self.lines, self.suppressed = now, 0, 0
            self.lines += 1
            if self.lines > self.per_s:
                self.suppressed += 1
                return
        LOG.warning("%s", message)


class _Watchdog:
    """Cancels calls still waiting for their body at their deadline (one thread for all)."""

    def __init__(self, period_s: float = 0.02):
        self._calls: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._period = period_s
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="edge-watchdog", daemon=True)
        self._thread.start()

    def add(self, context: grpc.ServicerContext, seconds: float) -> int:
        with self._lock:
            self._next += 1
            self._calls[self._next] = (time.monotonic() + seconds, context)
            return self._next

    def discard(self, key: int) -> None:
        with self._lock:
            self._calls.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            now = time.monotonic()
            with self._lock:
                due = [k for k, (t, _) in self._calls.items() if t <= now]
                contexts = [self._calls.pop(k)[1] for k in due]
            for ctx in contexts:
                self.cancelled += 1
                ctx.cancel()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


class EdgeService:
    """The protocol's handlers over a pool of interpreters of the bundle's partition model.

    Args:
      workers: interpreters (each call holds one exclusively while it computes).
      threads: LiteRT threads per interpreter.
      token: the shared secret clients must send; None only with `insecure`.
      insecure: serve without authentication (must be explicit).
      call_timeout_s: the longest a call may wait for its body or an interpreter.
      log_per_s: refusals logged per second at most (the rest are counted).

    Raises:
      BundleError: the bundle has no partitions. ValueError: an empty token, or no
        token without `insecure`.
    """

    def __init__(
        self, bundle: Bundle, *, workers: int = 4, threads: int = 1, token: str | None = None,
        insecure: bool = False, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        log_per_s: int = 20,
    ):  # fmt: skip
        if token is not None and not token.strip():
            raise ValueError("the token is empty (an empty --token or --token-file); give a "
                             "secret, or --insecure to serve without authentication")  # fmt: skip
        if token is None and not insecure:
            raise ValueError("no token: give --token or --token-file, or --insecure to serve "
                             "without authentication")  # fmt: skip
        if token is not None and insecure:
            raise ValueError("--insecure and a token exclude each other")
        part = bundle.manifest.get("partitions")
        if part is None:
            raise BundleError(
                f"bundle {bundle.path} has no partitions (export it with --partitions)"
            )
        allowed = sorted({sig for e in part["exits"] for sig in e["edge"].values()})
        self.bundle_digest = bundle.digest
        self.token = token.encode() if token else None
        self.call_timeout_s = float(call_timeout_s)
        self.pool: queue.Queue[Model] = queue.Queue()
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for _ in range(workers):
            model = bundle.load_partitions(threads)
            for name in allowed:  # allocate now, not on a device's first frame
                sig = model.signature(name)
                sig(np.zeros(sig.input_shape, sig.input_dtype))
                self.shapes[name] = (tuple(sig.input_shape), tuple(sig.output_shape))
            self.pool.put(model)
        self.served = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._log = _RateLog(log_per_s)
        self.watchdog = _Watchdog()
        self._handlers = {m: grpc.stream_unary_rpc_method_handler(functools.partial(self._call, m))
                          for m in oip.METHODS}  # fmt: skip

    @property
    def rejected(self) -> int:
        return sum(self.refused.values())

    def close(self) -> None:
        self.watchdog.close()

    # -- admission: runs in gRPC's polling thread with the headers, before any body ------------

    def handler(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The handler for a call, decided from its method and headers alone."""
        service, _, method = details.method.lstrip("/").partition("/")
        if service != oip.SERVICE or method not in oip.METHODS:
            return None  # gRPC answers UNIMPLEMENTED
        metadata = details.invocation_metadata
        try:
            oip.check_metadata(metadata)
        except oip.ProtocolError as e:
            return self._refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {e}")
        if method not in oip.OPEN_METHODS and not self._authorized(metadata):
            return self._refusal(grpc.StatusCode.UNAUTHENTICATED, f"{method}: missing or "
                                 "wrong token")  # fmt: skip
        return self._handlers[method]

    def _authorized(self, metadata) -> bool:
        if self.token is None:
            return True
        got = oip.token_of(metadata)
        return got is not None and hmac.compare_digest(got.encode(), self.token)

    def _refusal(self, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        # A streaming-request handler: it answers without waiting for (or reading) the body.
        return grpc.stream_unary_rpc_method_handler(
            lambda _requests, context: self._reject(context, code, message)
        )

    def _reject(self, context, code: grpc.StatusCode, message: str) -> NoReturn:
        with self._lock:
            self.refused[code.name] += 1
        self._log(f"{code.name} {context.peer()}: {message}")
        context.abort(code, message)

    # -- the call: body (bounded wait), parse, dispatch -----------------------------------------

    def _call(self, method: str, requests, context) -> bytes:
        t0 = time.monotonic()
        key = self.watchdog.add(context, min(context.time_remaining(), self.call_timeout_s))
        try:
            body = next(requests, None)
        except grpc.RpcError:  # cancelled: by the watchdog (no body in time) or by the client
            body = None
        finally:
            self.watchdog.discard(key)
        if body is None and not context.is_active():
            with self._lock:
                self.refused["NO_BODY"] += 1
            self._log(f"CANCELLED {method}: no request body in time (or the client left)")
            context.abort(grpc.StatusCode.CANCELLED, "no request body in time")
        if body is None:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{method}: no request (none, or over the size limit)")  # fmt: skip
        try:
            request = oip.parse(method, body)
            return getattr(self, f"_{method}")(request, context, t0).SerializeToString()
        except oip.ProtocolError as e:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {e}")

    def _ServerLive(self, request, context, t0):  # noqa: N802  (the protocol's method names)
        return pb.ServerLiveResponse(live=True)

    def _ServerReady(self, request, context, t0):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def _ServerMetadata(self, request, context, t0):  # noqa: N802
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=oip.VERSION)

    def _known(self, name: str, version: str) -> bool:
        return (name in self.shapes or name == oip.PROBE) and version in ("", oip.VERSION)

    def _unknown(self, context, name: str, version: str) -> NoReturn:
        self._reject(context, grpc.StatusCode.NOT_FOUND,
                     f"unknown model {name[:64]!r} version {version[:16]!r}")  # fmt: skip

    def _ModelReady(self, request, context, t0):  # noqa: N802
        return pb.ModelReadyResponse(ready=self._known(request.name, request.version))

    def _ModelMetadata(self, request, context, t0):  # noqa: N802
        if not self._known(request.name, request.version):
            self._unknown(context, request.name, request.version)
        resp = pb.ModelMetadataResponse(name=request.name, versions=[oip.VERSION],
                                        platform=oip.PLATFORM)  # fmt: skip
        if request.name == oip.PROBE:
            resp.inputs.append(oip.tensor_metadata(oip.PROBE_INPUT, "UINT8", [-1]))
            resp.outputs.append(oip.tensor_metadata(oip.PROBE_OUTPUT, "INT64", [1]))
        else:
            x_shape, y_shape = self.shapes[request.name]
            resp.inputs.append(oip.tensor_metadata(oip.INPUT, "FP32", x_shape))
            resp.outputs.append(oip.tensor_metadata(oip.OUTPUT, "FP32", y_shape))
            resp.properties[oip.ENCODINGS] = ",".join(ENCODINGS)
        resp.properties[oip.DIGEST] = self.bundle_digest
        return resp

    def _ModelInfer(self, request, context, t0):  # noqa: N802
        params = oip.check_request(request)
        name = request.model_name
        want = params.get(oip.DIGEST)
        if want and want != self.bundle_digest:
            self._reject(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"serves bundle {self.bundle_digest}, not {want[:64]}")  # fmt: skip
        if not self._known(name, request.model_version):
            self._unknown(context, name, request.model_version)
        output = oip.PROBE_OUTPUT if name == oip.PROBE else oip.OUTPUT
        if any(o.name != output for o in request.outputs):
            raise oip.ProtocolError(f"{name} has one output, {output!r}")
        if name == oip.PROBE:
            n = oip.read_probe(request)
            return oip.infer_response(request, np.array([n], "<i8"), digest=self.bundle_digest,
                                      server_ms=0.0, output=output, datatype="INT64")  # fmt: skip
        x_shape, _ = self.shapes[name]
        x, _ = oip.read_input(request, x_shape)
        remaining = min(context.time_remaining(), self.call_timeout_s - (time.monotonic() - t0))
        if remaining <= 0:
            self._reject(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"{name}: deadline passed")
        try:
            model = self.pool.get(timeout=remaining)
        except queue.Empty:
            self._reject(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"{name}: no interpreter free in time")  # fmt: skip
        try:
            t1 = time.perf_counter()
            y = np.array(model.signature(name)(x), np.float32, copy=True)
            server_ms = (time.perf_counter() - t1) * 1e3
        finally:
            self.pool.put(model)
        with self._lock:
            self.served += 1
        return oip.infer_response(request, y, digest=self.bundle_digest, server_ms=server_ms)


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, service: EdgeService):
        self._service = service

    def service(self, handler_call_details):
        return self._service.handler(handler_call_details)


def _check_port_free(address: str) -> None:
    """Refuses an address another process listens on (one line, before gRPC tries)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RuntimeError(f"cannot listen on {address}: {e}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                s.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise RuntimeError(f"cannot listen on {address}: the port is in use by "
                                       "another process") from None  # fmt: skip
                raise RuntimeError(f"cannot listen on {address}: {e.strerror}") from None


def make_server(
    service: EdgeService,
    address: str,
    *,
    max_pending: int = DEFAULT_MAX_PENDING,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.Server, int]:
    """A bound, not yet started gRPC server for `service`; returns ``(server, port)``.

    Raises:
      RuntimeError: the address cannot be bound (in use, even by another process).
    """
    _check_port_free(address)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_pending),
        handlers=(_Generic(service),),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # never share the port with another process
            # Headers up to 4x our own limit reach the handler (INVALID_ARGUMENT + a log
            # line); beyond that gRPC refuses them itself.
            ("grpc.max_metadata_size", 4 * oip.MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", 8 * oip.MAX_METADATA_BYTES),
        ],
        maximum_concurrent_rpcs=max_pending,
    )
    try:
        if tls:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {address}: {str(e).split(';')[0]}") from None
    if port == 0:
        raise RuntimeError(f"cannot listen on {address} (in use or not a local address)")
    return server, port


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.edge_server`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m runtime.edge_server",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--port", type=args_lib.count(0, 65535), required=True,
                   help="0 picks a free port (printed)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=args_lib.count(1, 256), default=4,
                   help="interpreters")  # fmt: skip
    p.add_argument("--threads", type=args_lib.threads(), default=1,
                   help="LiteRT threads per interpreter")  # fmt: skip
    p.add_argument("--max-pending", type=args_lib.count(1, 4096), default=DEFAULT_MAX_PENDING,
                   help="calls in progress at most (each has a thread)")  # fmt: skip
    p.add_argument("--call-timeout-s", type=args_lib.real(0.01, 3600.0),
                   default=DEFAULT_CALL_TIMEOUT_S,
                   help="longest wait for a call's body or an interpreter")  # fmt: skip
    p.add_argument("--token", default=None, help="shared secret clients must send")
    p.add_argument("--token-file", default=None, type=args_lib.text_file(),
                   help="read the shared secret from a file")  # fmt: skip
    p.add_argument("--insecure", action="store_true",
                   help="serve without a token (anyone who reaches the port may call)")  # fmt: skip
    p.add_argument("--tls-cert", default=None, type=args_lib.existing_file(),
                   help="PEM certificate chain (enables TLS)")  # fmt: skip
    p.add_argument("--tls-key", default=None, type=args_lib.existing_file(),
                   help="PEM private key")  # fmt: skip
    p.add_argument("--max-message-bytes", type=args_lib.count(1024, 1 << 30),
                   default=DEFAULT_MAX_MESSAGE)  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    if args.token is not None and args.token_file:
        raise ValueError("--token and --token-file exclude each other")
    token = args.token
    if args.token_file:
        token = args_lib.read_text(args.token_file, "token file").strip()
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        with open(args.tls_cert, "rb") as f, open(args.tls_key, "rb") as g:
            tls = (f.read(), g.read())
    if token is not None and not token.strip():
        raise ValueError("the token is empty (an empty --token or --token-file); give a "
                         "secret, or --insecure to serve without authentication")  # fmt: skip
    address = f"{args.host}:{args.port}"
    _check_port_free(address)  # before loading interpreters: fail fast
    service = EdgeService(Bundle.from_dir(args.bundle), workers=args.workers,
                          threads=args.threads, token=token, insecure=args.insecure,
                          call_timeout_s=args.call_timeout_s)  # fmt: skip
    server, port = make_server(service, address, max_pending=args.max_pending,
                               max_message_bytes=args.max_message_bytes, tls=tls)  # fmt: skip
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s edge_server %(levelname)s %(message)s")  # fmt: skip
    server.start()
    # The handler only appends to a list: Event.set() inside a signal handler takes the
    # Condition lock the interrupted Event.wait() may hold, and a SIGTERM hung the server.
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    auth = "auth: token" if token else "auth: OFF (--insecure)"
    print(f"edge server listening on {args.host}:{port} ({'TLS' if tls else 'plaintext'}, "
          f"{auth}, {args.workers} workers, {args.max_pending} pending calls at most, pid "
          f"{os.getpid()})", flush=True)  # fmt: skip
    while not stopping:
        time.sleep(0.1)
    server.stop(grace=1.0).wait()
    service.close()
    refused = ", ".join(f"{k} {v}" for k, v in sorted(service.refused.items()))
    print(f"served {service.served}, rejected {service.rejected}"
          + (f" ({refused})" if refused else ""), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
