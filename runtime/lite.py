"""A thin, low-overhead layer over `ai_edge_litert.interpreter.Interpreter`.

`SignatureRunner.__call__` resizes and re-allocates the subgraph on every
call, which costs more than a small segment's inference. A `Signature` here
allocates once (shapes are static: batch 1) and then only sets the input,
invokes and reads the output, so splitting a network into segments does not
pay a per-call allocation (`BENCHMARKS.md`, split overhead).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType


class Signature:
    """One signature of a loaded model at a fixed input shape.

    ``sig(x) -> y`` for a signature with one output. A signature with several outputs (a
    bundle's ``stage_<k>``) is loaded with `outputs`, its output names in the order wanted;
    ``sig(x)`` then returns a tuple of arrays in exactly that order, whatever order LiteRT
    lists them in (the names LiteRT reports must be exactly `outputs`).

    Attributes:
      output_names: the outputs returned, in order.
      output_shapes: their shapes, in the same order.
      output_name, output_shape: the first output's (the only one of a one-output signature).
    """

    def __init__(self, interpreter: Interpreter, name: str, outputs: Sequence[str] | None = None):
        runner = interpreter.get_signature_runner(name)
        (self.input_name, in_detail), *rest_in = runner.get_input_details().items()
        details = runner.get_output_details()
        if rest_in:
            raise ValueError(f"signature {name!r} must have one input")
        if outputs is None:
            if len(details) != 1:
                raise ValueError(
                    f"signature {name!r} has {len(details)} outputs "
                    f"({', '.join(sorted(details))}); load it with outputs=(names, in order)"
                )
            names = tuple(details)
        else:
            names = tuple(outputs)
            if len(set(names)) != len(names) or set(names) != set(details):
                raise ValueError(
                    f"signature {name!r} outputs {', '.join(sorted(details))}; "
                    f"asked for {', '.join(map(str, names))}"
                )
        self.name = name
        self.input_shape = tuple(int(d) for d in in_detail["shape"])
        self.input_dtype = np.dtype(in_detail["dtype"])
        self.output_names = names
        self.output_shapes = tuple(tuple(int(d) for d in details[n]["shape"]) for n in names)
        self.output_name, self.output_shape = names[0], self.output_shapes[0]
        self._multi = outputs is not None
        self._runner = runner
        # The fast path uses the runner's own wrapper calls minus the per-call
        # resize/allocate; fall back to the public runner if they are missing.
        wrapper = getattr(runner, "_interpreter_wrapper", None)
        sub = getattr(runner, "_subgraph_index", None)
        if wrapper is not None and sub is not None and hasattr(wrapper, "Invoke"):
            wrapper.AllocateTensors(sub)
            self._wrapper, self._sub = wrapper, sub
            self._in = runner._inputs[self.input_name]
            tensors = dict(runner._outputs)
            self._out = tensors[self.output_name]
            self._outs = tuple(tensors[n] for n in names)
        else:  # pragma: no cover - other LiteRT versions
            self._wrapper = None

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Runs the signature on one input of exactly `input_shape` / `input_dtype`.

        Returns the output (a copy), or for a signature loaded with `outputs` a tuple of them.
        """
        if self._wrapper is None:  # pragma: no cover
            out = self._runner(**{self.input_name: x})
            return (
                tuple(out[n] for n in self.output_names) if self._multi else out[self.output_name]
            )
        w, sub = self._wrapper, self._sub
        w.SetTensor(self._in, x, sub)
        w.Invoke(sub)
        if self._multi:
            return tuple([w.GetTensor(i, sub) for i in self._outs])
        return w.GetTensor(self._out, sub)


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
        self._sigs: dict[tuple, Signature] = {}

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

    def signature(self, name: str, outputs: Sequence[str] | None = None) -> Signature:
        """The `Signature` `name`; `outputs` (names, in order) for one with several outputs.

        Raises:
          KeyError: no such signature. ValueError: its outputs are not `outputs` (or, without
            `outputs`, it has more than one).
        """
        key = (name, None if outputs is None else tuple(outputs))
        if key not in self._sigs:
            if name not in self.signature_names:
                raise KeyError(
                    f"model has no signature {name!r}; it has {', '.join(self.signature_names)}"
                )
            self._sigs[key] = Signature(self.interpreter, name, key[1])
        return self._sigs[key]

    def output_names(self, name: str) -> tuple[str, ...]:
        """The output names LiteRT reports for signature `name`, in its own order."""
        if name not in self.signature_names:
            raise KeyError(
                f"model has no signature {name!r}; it has {', '.join(self.signature_names)}"
            )
        return tuple(self.interpreter.get_signature_runner(name).get_output_details())
