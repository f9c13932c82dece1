"""AMS: approximate model scheduling over MCDNN catalogs (numpy + LiteRT only).

Modules, by concept: `catalog` (the schema of ``catalog.json``: options, knee,
Pareto front), `state` (budgets, requests, decisions, the cache), `policies`,
`simulate` (a day, its summary), `optimum` (the hindsight MILP), `replay`
(sampled requests run for real) and `cli` (``python -m runtime.ams``).

  python -m runtime.ams --bundle=CATALOG_DIR --trace=trace.json --json=OUT \\
      [--policies=mcdnn,pace,best_model,original] [--energy-budget=0.12x] \\
      [--memory-mb=2.5] [--money=0] [--latency-ms=50] [--execute=200]

`--bundle` is a catalog directory written by ``train.catalog`` (its
``catalog.json`` lists every app's variants with MEASURED costs; see
`Catalog`). A day of requests (`runtime.traces`) is served by pure policies
``step(state, request) -> (decision, state)``:

* ``mcdnn`` -- MCDNN's Algorithm 1 (Han et al., MobiSys'16): a per-request
  energy budget ``e_n = (e - de_n*T/dt_n) * f_n / (T * sum_{i in cache} f_i^2)``
  (``e`` energy left, ``T`` time left in the day, ``f_i`` request
  frequencies, ``de_n`` the energy app n spent on loads over the ``dt_n``
  seconds since its first request, i.e. reloads projected to the end of the
  day) and the same for cloud
  money; on a cache miss the most accurate option (device variant or cloud)
  within the budgets and the latency limit *including the load*, evicting LRU
  entries to make room; on a hit the cached variant runs and the best option is
  re-picked "in the background" (loaded now, used from the next request), so
  variants grow and shrink with the frequencies.
* ``pace`` -- ours: certainty-equivalent re-solving. Every `resolve_s` it
  estimates each app's remaining requests (blend of the recent and the
  day-average rate times the time left; with ``prior_rate`` the day's total
  rate is also blended with past days' rate, as `train.lite_mcdnn` does) and
  prices energy (``lam``) and money
  (``mu``) so that the plan ``argmax acc - lam*energy - mu*money`` (or skip)
  spends exactly what is left; the plan must fit the cache. Requests follow
  the plan; loads are amortized over the app's expected requests.
* ``best_model`` -- one static variant per app, the knee of its
  energy/accuracy Pareto front (MCDNN's "Best Model"), device only.
* ``original`` -- the unapproximated model, device only.

`offline_optimum` solves the day with hindsight as an integer program
(`scipy.optimize.milp`, optional): how many requests of each app each option
serves, which device variants stay resident (load energy once, cache capacity),
the same energy/money/latency budgets; maximizing expected correct answers.
Each policy's regret is measured against it.

A day simulates in about a second. ``--execute=N`` also runs N sampled
requests for real: the policy's loads and evictions are replayed with the
LiteRT interpreter and each sampled request runs its chosen variant's bundle
on a test image of its app (``eval.npz`` in the catalog), so the simulated
accuracy and latency are checked against reality.
"""

from runtime.ams.catalog import CLOUD, DEVICE, AmsError, Catalog, Option, knee, load_catalog, pareto
from runtime.ams.cli import format_report, main, resolve_budgets, run
from runtime.ams.optimum import offline_optimum
from runtime.ams.policies import (
    POLICIES,
    SKIP,
    best_model_policy,
    make_policy,
    mcdnn_budgets,
    mcdnn_policy,
    original_policy,
    pace_policy,
    static_policy,
)
from runtime.ams.replay import execute_sampled
from runtime.ams.simulate import simulate, summarize
from runtime.ams.state import (
    RATE_TAU_S,
    Budgets,
    CacheEntry,
    Decision,
    Policy,
    Request,
    State,
    rate,
)

__all__ = [
    "CLOUD", "DEVICE", "POLICIES", "RATE_TAU_S", "SKIP", "AmsError", "Budgets", "CacheEntry",
    "Catalog", "Decision", "Option", "Policy", "Request", "State", "best_model_policy",
    "execute_sampled", "format_report", "knee", "load_catalog", "main", "make_policy",
    "mcdnn_budgets", "mcdnn_policy", "offline_optimum", "original_policy", "pace_policy",
    "pareto", "rate", "resolve_budgets", "run", "simulate", "static_policy", "summarize",
]  # fmt: skip
