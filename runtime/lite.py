"""A thin, low-overhead layer over `ai_edge_litert.interpreter.Interpreter`.

`SignatureRunner.__call__` resizes and re-allocates the subgraph on every
call, which costs more than a small segment's inference. A `Signature` here
allocates once (shapes are static: batch 1) and then only sets the input,
invokes and reads the output, so splitting a network into segments does not
pay a per-call allocation (`BENCHMARKS.md`, split overhead).
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType


class Signature:
    """One signature of a loaded model: ``sig(x) -> y`` at a fixed input shape."""

    def __init__(self, interpreter: Interpreter, name: str):
        runner = interpreter.get_signature_runner(name)
        (self.input_name, in_detail), *rest_in = runner.get_input_details().items()
        (self.output_name, out_detail), *rest_out = runner.get_output_details().items()
        if rest_in or rest_out:
            raise ValueError(f"signature {name!r} must have one input and one output")
        self.name = name
        self.input_shape = tuple(int(d) for d in in_detail["shape"])
        self.input_dtype = np.dtype(in_detail["dtype"])
        self.output_shape = tuple(int(d) for d in out_detail["shape"])
        self._runner = runner
        # The fast path uses the runner's own wrapper calls minus the per-call
        # resize/allocate; fall back to the public runner if they are missing.
        wrapper = getattr(runner, "_interpreter_wrapper", None)
        sub = getattr(runner, "_subgraph_index", None)
        if wrapper is not None and sub is not None and hasattr(wrapper, "Invoke"):
            wrapper.AllocateTensors(sub)
            self._wrapper, self._sub = wrapper, sub
            self._in = runner._inputs[self.input_name]
            self._out = dict(runner._outputs)[self.output_name]
        else:  # pragma: no cover - other LiteRT versions
            self._wrapper = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Runs the signature on one input of exactly `input_shape` / `input_dtype`."""
        if self._wrapper is None:  # pragma: no cover
            return self._runner(**{self.input_name: x})[self.output_name]
        self._wrapper.SetTensor(self._in, x, self._sub)
        self._wrapper.Invoke(self._sub)
        return self._wrapper.GetTensor(self._out, self._sub)


class Model:
    """A loaded .tflite with lazily created `Signature`s.

    `Model(path)` reads a file that is not part of a bundle; a bundle's models are built from
    the bytes it verified (`Model.from_bytes`, through `runtime.Bundle.load`), so a file
    swapped on disk after verification never runs.
    """

    def __init__(
        self,
        model_path: str | None = None,
        num_threads: int = 1,
        *,
        content: bytes | None = None,
        default_delegates: bool = True,
    ):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if (model_path is None) == (content is None):
            raise ValueError("Model needs exactly one of model_path and content")
        self.path = model_path
        self.num_threads = num_threads
        # Without default delegates (XNNPACK): LiteRT's builtin kernels only, as bundle
        # verification prepares a model (no weight repacking, no delegate log line).
        kw = (
            {}
            if default_delegates
            else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
        )
        if content is not None:
            self.interpreter = Interpreter(model_content=content, num_threads=num_threads, **kw)
        else:
            self.interpreter = Interpreter(model_path=model_path, num_threads=num_threads, **kw)
        self.signature_names = tuple(self.interpreter.get_signature_list())
        self._sigs: dict[str, Signature] = {}

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        num_threads: int = 1,
        *,
        name: str | None = None,
        default_delegates: bool = True,
    ) -> Model:
        """An interpreter over `data` (the interpreter keeps a reference; never re-read).

        `name` (e.g. the file the bytes came from) is kept as `path`, for messages only.
        """
        model = cls(None, num_threads, content=bytes(data), default_delegates=default_delegates)
        model.path = name
        return model

    def signature(self, name: str) -> Signature:
        if name not in self._sigs:
            if name not in self.signature_names:
                raise KeyError(
                    f"model has no signature {name!r}; it has {', '.join(self.signature_names)}"
                )
            self._sigs[name] = Signature(self.interpreter, name)
        return self._sigs[name]
