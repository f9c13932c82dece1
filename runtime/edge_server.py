"""The edge side of Edgent co-inference: a gRPC server running partition signatures.

  python -m runtime.edge_server --bundle=BUNDLE --port=P [--host=127.0.0.1] [--workers=4]
      [--threads=1] [--token=SECRET | --token-file=PATH] [--tls-cert=CRT --tls-key=KEY]
      [--max-message-bytes=4194304]

Methods (grpcio generic handlers, raw bytes in `runtime.wire` format, no protoc):

* ``/flexjax.Edge/Infer``: request = a tensor + ``{"id", "sig"}``; ``sig`` must be
  one of the bundle's edge partition signatures and the tensor must have its
  input shape and dtype. The response carries the logits, the request id and
  the server's compute time (``server_ms``) so the client can tell transfer
  time from compute time.
* ``/flexjax.Edge/Ping``: returns ``{"bundle": sha256 of the manifest,
  "received": bytes}`` (any payload is accepted up to the size limit: clients
  use it to probe bandwidth and to check both sides run the same bundle).

Safety: messages above ``--max-message-bytes`` are refused by gRPC itself
(RESOURCE_EXHAUSTED); malformed or truncated requests, unknown signatures and
wrong shapes get INVALID_ARGUMENT with one line; a wrong or missing shared
token gets UNAUTHENTICATED (compared in constant time); a request whose
deadline has passed, or that waited for an interpreter longer than its
deadline allows, gets DEADLINE_EXCEEDED. Nothing is unpickled. Many devices at
once: ``--workers`` RPC threads share a pool of as many LiteRT interpreters
(an interpreter is not thread-safe, so each call holds one exclusively).
"""

from __future__ import annotations

import concurrent.futures
import hmac
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np

from runtime import args as args_lib
from runtime import wire
from runtime.bundle import Bundle, BundleError
from runtime.lite import Model

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


class EdgeService:
    """The request handlers over a pool of interpreters of the bundle's partition model."""

    def __init__(
        self, bundle: Bundle, *, workers: int = 4, threads: int = 1, token: str | None = None
    ):
        part = bundle.manifest.get("partitions")
        if part is None:
            raise BundleError(
                f"bundle {bundle.path} has no partitions (export it with --partitions)"
            )
        self.path = os.path.join(bundle.path, part["model"])
        self.allowed = {sig for e in part["exits"] for sig in e["edge"].values()}
        self.shapes = {n: tuple(part["signatures"][n]["input_shape"]) for n in self.allowed}
        self.bundle_digest = bundle.digest
        self.token = token.encode() if token else None
        self.pool: queue.Queue[Model] = queue.Queue()
        for _ in range(workers):
            model = bundle.load_partitions(threads)
            for name in sorted(self.allowed):  # allocate now, not on a device's first frame
                sig = model.signature(name)
                sig(np.zeros(sig.input_shape, sig.input_dtype))
            self.pool.put(model)
        self.served = 0
        self.rejected = 0
        self._lock = threading.Lock()

    def _authorize(self, context) -> None:
        if self.token is None:
            return
        got = dict(context.invocation_metadata()).get(wire.TOKEN_KEY, "")
        if not hmac.compare_digest(got.encode(), self.token):
            self._reject(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def _reject(self, context, code, message: str):
        with self._lock:
            self.rejected += 1
        context.abort(code, message)

    def ping(self, request: bytes, context) -> bytes:
        self._authorize(context)
        return wire.encode({"bundle": self.bundle_digest, "received": len(request)})

    def infer(self, request: bytes, context) -> bytes:
        self._authorize(context)
        try:
            header, x = wire.decode(request, required={"id": int, "sig": str}, finite=True)
        except wire.WireError as e:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sig = header["sig"]
        if sig not in self.allowed:
            self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown edge signature {sig!r}"
            )
        if x is None or tuple(x.shape) != self.shapes[sig] or x.dtype != np.float32:
            got = None if x is None else (list(x.shape), x.dtype.name)
            self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT,
                f"{sig} takes float32 {list(self.shapes[sig])}, got {got}",
            )  # fmt: skip
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self._reject(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed on arrival")
        try:
            model = self.pool.get(timeout=remaining if remaining is not None else 30.0)
        except queue.Empty:
            self._reject(context, grpc.StatusCode.DEADLINE_EXCEEDED, "no interpreter free in time")
        try:
            t0 = time.perf_counter()
            y = np.array(model.signature(sig)(np.ascontiguousarray(x)), copy=True)
            server_ms = (time.perf_counter() - t0) * 1e3
        finally:
            self.pool.put(model)
        with self._lock:
            self.served += 1
        return wire.encode({"id": header["id"], "server_ms": server_ms}, y)


def make_server(
    service: EdgeService,
    address: str,
    *,
    workers: int = 4,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.Server, int]:
    """A started-ready (not started) gRPC server for `service`; returns ``(server, port)``.

    Raises:
      RuntimeError: the address cannot be bound.
    """
    handlers = grpc.method_handlers_generic_handler(
        wire.SERVICE,
        {
            "Infer": grpc.unary_unary_rpc_method_handler(service.infer),
            "Ping": grpc.unary_unary_rpc_method_handler(service.ping),
        },
    )
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers),
        handlers=(handlers,),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        maximum_concurrent_rpcs=workers * 16,
    )
    try:
        if tls:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {address}: {e}") from None
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
                   help="RPC threads = interpreters")  # fmt: skip
    p.add_argument("--threads", type=args_lib.threads(), default=1,
                   help="LiteRT threads per interpreter")  # fmt: skip
    p.add_argument("--token", default=None, help="shared secret clients must send")
    p.add_argument("--token-file", default=None, type=args_lib.text_file(),
                   help="read the shared secret from a file")  # fmt: skip
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
    token = args.token
    if args.token_file:
        token = args_lib.read_text(args.token_file, "token file").strip()
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        with open(args.tls_cert, "rb") as f, open(args.tls_key, "rb") as g:
            tls = (f.read(), g.read())
    service = EdgeService(Bundle.from_dir(args.bundle), workers=args.workers,
                          threads=args.threads, token=token)  # fmt: skip
    server, port = make_server(
        service, f"{args.host}:{args.port}", workers=args.workers,
        max_message_bytes=args.max_message_bytes, tls=tls,
    )  # fmt: skip
    server.start()
    # The handler only appends to a list: Event.set() inside a signal handler takes the
    # Condition lock the interrupted Event.wait() may hold, and a SIGTERM hung the server.
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    print(f"edge server listening on {args.host}:{port} ({'TLS' if tls else 'plaintext'}, "
          f"{args.workers} workers)", flush=True)  # fmt: skip
    while not stopping:
        time.sleep(0.1)
    server.stop(grace=1.0).wait()
    print(f"served {service.served}, rejected {service.rejected}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
