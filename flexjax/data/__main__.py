"""``python -m flexjax.data``: prepare and inspect the real data.

    # decode + label the clips into the cache (a no-op when cached) and print
    # samples per clip and split; --json writes the same as JSON
    python -m flexjax.data clips [--train=vtest,bikes --val=... --test=...]
        [--fps=5 --resolution=224 --tiles=1:0.5:0.5,0.5:0:0 --max-frames=0]
        [--reference=efficientnet_lite2 --cache-dir=DIR --json=PATH]
    # load registered datasets and print split sizes and load time
    python -m flexjax.data datasets fashion_mnist mnist [--repeat=2]

Errors (unknown clip or dataset, missing package, undecodable video) are one
``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from flexjax.data import clips as clips_lib
from flexjax.data import datasets as datasets_lib
from flexjax.io import write_json_atomic
from runtime import args as args_lib


def _parse_tiles(text: str) -> tuple[clips_lib.Tile, ...]:
    try:
        tiles = tuple(tuple(float(v) for v in t.split(":")) for t in text.split(",") if t)
    except ValueError:
        raise ValueError(
            f"--tiles must look like 1:0.5:0.5,0.5:0:0 (scale:y:x); got {text!r}"
        ) from None
    return tiles  # type: ignore[return-value]


def _clips(args: argparse.Namespace) -> dict:
    config = clips_lib.ClipConfig(
        train=args.train,
        val=args.val,
        test=args.test,
        fps=args.fps,
        max_frames=args.max_frames,
        resolution=args.resolution,
        tiles=_parse_tiles(args.tiles),
        reference=args.reference,
    )
    start = time.perf_counter()
    splits = clips_lib.load_clips(config, cache_dir=args.cache_dir)
    seconds = time.perf_counter() - start
    for s in ("train", "val", "test"):
        part = getattr(splits, s)
        for name in part.clips:
            i = splits.info[name]
            how = "cached" if i["cached"] else f"decoded {i['decode_s']}s, labelled {i['label_s']}s"
            print(f"{s:5s} {name:13s} {i['samples']:5d} samples  ({how})")
        print(f"{s:5s} {'total':13s} {len(part):5d} samples")
    print(f"{seconds:.2f} s")
    return {
        "config": config.to_dict(),
        "seconds": round(seconds, 3),
        "splits": {s: len(getattr(splits, s)) for s in ("train", "val", "test")},
        "clips": splits.info,
    }


def _datasets(args: argparse.Namespace) -> dict:
    out = {}
    for name in args.names:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            splits = datasets_lib.load(name)
            times.append(round(time.perf_counter() - start, 3))
        sizes = [len(splits.train), len(splits.val), len(splits.test)]
        print(f"{name:14s} train/val/test {sizes}  {splits.input_shape}  load {times} s")
        out[name] = {"sizes": sizes, "input_shape": splits.input_shape, "seconds": times}
    return out


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m flexjax.data`` (every value's domain declared)."""
    d = clips_lib.ClipConfig()
    p = args_lib.ArgumentParser(prog="python -m flexjax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=args_lib.ArgumentParser)
    c = sub.add_parser("clips", help="decode + label clips into the cache")
    c.add_argument("--train", default=",".join(d.train))
    c.add_argument("--val", default=",".join(d.val))
    c.add_argument("--test", default=",".join(d.test))
    c.add_argument("--fps", type=args_lib.real(0.0, clips_lib.MAX_FPS), default=d.fps,
                   help="sampled frames per second (0 = every frame)")  # fmt: skip
    c.add_argument("--max-frames", type=args_lib.count(0, clips_lib.MAX_FRAMES),
                   default=d.max_frames, help="per clip (0 = all)")  # fmt: skip
    c.add_argument("--resolution", type=args_lib.count(1, clips_lib.MAX_RESOLUTION),
                   default=d.resolution)  # fmt: skip
    c.add_argument("--tiles", default="1:0.5:0.5", help="scale:y:x,... (see flexjax.data.clips)")
    c.add_argument("--reference", default=d.reference)
    c.add_argument("--cache-dir", default=None)
    c.add_argument("--json", default=None, type=args_lib.output_file(),
                   help="also write the summary here")  # fmt: skip
    ds = sub.add_parser("datasets", help="load datasets, print sizes and load time")
    ds.add_argument("names", nargs="+")
    ds.add_argument("--repeat", type=args_lib.count(1, 100), default=1)
    ds.add_argument("--json", default=None, type=args_lib.output_file(),
                    help="also write the summary here")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    summary = _clips(args) if args.command == "clips" else _datasets(args)
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
