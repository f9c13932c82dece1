# ruff: noqa: E402, E501  (a study script: limit_cpu_threads runs before JAX is imported)
"""Study (BENCHMARKS "stills for distillation", held-out images): do heads distilled on crops of 30 still images agree with the backbone on crops of 6 others?"""

import os

from flexjax.cli import limit_cpu_threads

limit_cpu_threads(1)
import numpy as np

from configs import clips_lite0_edgent
from flexjax import distill_exits as de
from flexjax import feature_cache
from flexjax.data import stills
from flexjax.models import pretrained

config = clips_lite0_edgent.get_config()
d = config.distill
backbone, variables = pretrained.load(d.backbone, d.image_size)
cache = feature_cache.open_cache(os.path.join(os.environ.get("OUT", "runs/stills"), "features"))
M = len(stills.still_paths())
n_clip, n = 475, cache.index["frames"]["train"]
image = np.full(n, -1)
image[n_clip:] = np.arange(n - n_clip) % M
held = (image >= 0) & (image % 6 == 0)
w = (~held).astype(float)
print(
    f"{M} images; held out {sorted({os.path.basename(stills.still_paths()[i]) for i in image[held]})} ({held.sum()} crops)"
)
for steps in (300, 1000):
    net = de.attach(backbone, (7, 11, 15), de.head_layers("conv_pool_dense", 1000, 128))
    st = de.DistillSettings(steps=steps, batch_size=64, learning_rate=3e-3, temperature=2.0)
    v, _ = de.train_heads(net, variables, cache, st, weights=w)
    lg = de.exit_logits(net, v, cache, "train")
    t = lg["final"].argmax(-1)
    for e in ("exit_7", "exit_11", "exit_15"):
        a = lg[e].argmax(-1) == t
        print(
            f"steps {steps} {e}: agreement with backbone top-1 on trained crops {a[(image >= 0) & ~held].mean():.3f}, "
            f"train-clip frames {a[:n_clip].mean():.3f}, held-out images' crops {a[held].mean():.3f}",
            flush=True,
        )
