"""Names shared by export, the runtime and the jobs: built and parsed here, nowhere else.

Files of a bundle, signature names and partition points are a contract
between the exporter that writes them and the runtime that reads them; each
is spelled once, below. Standard library only.

* Exits: ``exit_3`` (a side exit after backbone position 3) and `FINAL`.
* Signatures of a bundle: ``segment_3`` (the backbone up to exit_3),
  ``exit_3`` (its head), ``stage_3`` (``segment_3`` then ``exit_3`` in one call: two outputs,
  `STAGE_OUTPUTS`), ``segment_final``, and `FULL` (the whole backbone).
* Partitions (Edgent): ``dev_p05`` (the device runs positions ``[0, 5)``),
  ``edge_3_p05`` (the edge runs ``[5, exit_3]`` and exit_3's head); the
  manifest keys cut points as strings (``"5"``).
* A co-inference plan's label: ``exit_3@p=5``, ``exit_3@device-only``,
  ``exit_3@edge-only``.
"""

from __future__ import annotations

FINAL = "final"  # the backbone's own exit
FULL = "full"  # the signature running the whole backbone as one graph

# Output tensor names of the signatures (what LiteRT reports for each).
ACTIVATION = "activation"  # a segment's output: the next segment's input
LOGITS = "logits"  # an exit head's (or the final segment's) output
# A stage signature's outputs, in the order the runtime returns them.
STAGE_OUTPUTS = (ACTIVATION, LOGITS)

# Files.
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
MODEL_FILE = "model.tflite"
PARTITIONS_FILE = "partitions.tflite"
SHARED_MANIFEST = "shared.json"  # MCDNN's shared stem + heads
CATALOG_FILE = "catalog.json"  # MCDNN's catalog of variants
CONFIG_FILE = "config.json"  # a workdir's validated config
REPORT_FILE = "report.json"  # a job's report

DEVICE_ONLY = "device-only"
EDGE_ONLY = "edge-only"


def exit_key(exit_name: str) -> str:
    """``exit_3`` -> ``3``; any other name (``final``) is kept as is."""
    return exit_name[len("exit_") :] if exit_name.startswith("exit_") else exit_name


def segment_name(exit_name: str) -> str:
    """The signature of the backbone segment that ends at `exit_name` (``segment_3``)."""
    return f"segment_{exit_key(exit_name)}"


def head_name(exit_name: str) -> str:
    """The signature of `exit_name`'s head (``exit_3``)."""
    return f"exit_{exit_key(exit_name)}"


def stage_name(exit_name: str) -> str:
    """The signature running `exit_name`'s segment and then its head in one call (``stage_3``).

    Its outputs are `STAGE_OUTPUTS`: the segment's activation and the head's logits.
    """
    return f"stage_{exit_key(exit_name)}"


def cut_key(p: int) -> str:
    """A partition point as the manifest keys it (``"5"``)."""
    return str(int(p))


def cut_point(key: str | int) -> int:
    """The partition point of a manifest key (``"5"`` -> 5)."""
    return int(key)


def device_name(p: int) -> str:
    """The device-side signature running backbone positions ``[0, p)`` (``dev_p05``)."""
    return f"dev_p{int(p):02d}"


def edge_name(exit_name: str, p: int) -> str:
    """The edge-side signature running ``[p, exit]`` + the exit's head (``edge_3_p05``)."""
    return f"edge_{exit_key(exit_name)}_p{int(p):02d}"


def plan_label(exit_name: str, partition: int | None) -> str:
    """``exit_3@p=5``; partition None is device-only, 0 edge-only."""
    where = {None: DEVICE_ONLY, 0: EDGE_ONLY}.get(partition, f"p={partition}")
    return f"{exit_name}@{where}"


def parse_plan_label(label: str) -> tuple[str, int | None]:
    """``(exit name, partition)`` of a `plan_label` (partition None: device-only).

    Raises:
      ValueError: not a plan label.
    """
    exit_name, sep, where = label.partition("@")
    if not sep or not exit_name:
        raise ValueError(
            f"not a plan label (EXIT@p=N, EXIT@device-only, EXIT@edge-only): {label!r}"
        )
    if where == DEVICE_ONLY:
        return exit_name, None
    if where == EDGE_ONLY:
        return exit_name, 0
    if where.startswith("p=") and where[2:].isdigit():
        return exit_name, int(where[2:])
    raise ValueError(f"not a plan label (EXIT@p=N, EXIT@device-only, EXIT@edge-only): {label!r}")


def partition_text(label: str) -> str:
    """The part of a plan label after ``@`` (``p=5``, ``device-only``), for figures."""
    return label.partition("@")[2]
