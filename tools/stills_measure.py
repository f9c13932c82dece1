# ruff: noqa: E402, E501  (a study script: limit_cpu_threads runs before JAX is imported)
"""Study (issue 13/14, BENCHMARKS "stills for distillation"): Edgent lite0 exits distilled with 0 / N stills crops; agreement on val / test.

Builds ONE feature cache (train = the train clips' frames + stills[:NMAX]; val; test) and
trains heads on train prefixes: with stills[:N] the prefix is exactly the train split
pipelines.edgent_distill.train builds for distill.stills = N (load_stills(N) is a prefix of
load_stills(NMAX)), so the heads see what the pipeline gives them.
"""

import json
import os
import sys
import time

from flexjax.cli import limit_cpu_threads

limit_cpu_threads(1)
import numpy as np

from configs import clips_lite0_edgent
from flexjax import distill_exits as de
from flexjax import feature_cache
from flexjax.data import clips as clips_lib
from flexjax.data import stills
from flexjax.models import pretrained
from pipelines import edgent_distill as ed

OUT = os.environ.get("OUT", "runs/stills")  # the feature cache and results.jsonl
NMAX = int(os.environ.get("NMAX", "5000"))
GRID = json.loads(sys.argv[1])  # [[head, n_stills, steps], ...]

config = clips_lite0_edgent.get_config()
d = config.distill
backbone, variables = pretrained.load(d.backbone, d.image_size)
loaded = clips_lib.load_clips(ed.clip_config(config))
positions = ed.exit_positions(config, backbone)
pool, _ = de.classifier(backbone)
n_clip = len(loaded.train)
t0 = time.time()
frames = {
    "train": np.concatenate([loaded.train.frames, stills.load_stills(NMAX, d.image_size)]),
    "val": loaded.val.frames,
    "test": loaded.test.frames,
}
cache = feature_cache.build(
    backbone, variables, frames, (*positions, pool), os.path.join(OUT, "features"), log=print
)
del frames
print(f"cache ready in {time.time() - t0:.0f}s; load {os.getloadavg()}", flush=True)


class Prefix:
    def __init__(self, cache, k):
        self.c, self.k = cache, k
        self.index = cache.index

    @property
    def positions(self):
        return self.c.positions

    def features(self, split, p):
        a = self.c.features(split, p)
        return a[: self.k] if split == "train" else a

    def logits(self, split):
        a = self.c.logits(split)
        return a[: self.k] if split == "train" else a


for head, n, steps in GRID:
    t = time.time()
    features = int(backbone.shapes()[-1][0][-1]) if head == "mimic" else d.head_features
    net = de.attach(backbone, positions, de.head_layers(head, backbone.num_classes, features))
    settings = de.DistillSettings(
        steps=steps,
        batch_size=d.batch_size,
        learning_rate=float(d.learning_rate),
        temperature=float(d.temperature),
        seed=0,
    )
    v, losses = de.train_heads(net, variables, Prefix(cache, n_clip + n), settings, log=print)
    rep = ed.evaluate(net, v, Prefix(cache, n_clip + n), loaded)["accuracy"]
    row = {
        "head": head,
        "stills": n,
        "steps": steps,
        "train_frames": n_clip + n,
        "val": rep["val"],
        "test": rep["test"],
        "losses": losses,
        "seconds": round(time.time() - t, 1),
        "load": os.getloadavg(),
    }
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
