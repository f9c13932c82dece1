"""Edgent's pure parts on hand-made values: planner, bandwidth, latency model, protocol, link."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from runtime import latency_model as lm
from runtime import oip, planner
from runtime.coinfer import MAX_CALL_S, EdgeFailure, Link, clamp_timeout
from runtime.encoding import Encoding, calibrate
from runtime.planner import BandwidthEstimator, Option
from runtime.profile import Target, Timeline


def _opt(exit_index, partition, device_ms, edge_ms=0.0, up=0, name=None):
    remote = partition is not None
    return Option(
        name or f"e{exit_index}", exit_index, partition, "d" if device_ms else None,
        "e" if remote else None, device_ms, edge_ms, up if remote else 0, 40 if remote else 0,
    )  # fmt: skip


# Two exits. Exit 1 (deeper): device-only 100 ms; edge-only sends 10 kB, 5 ms on the edge;
# a cut at p=4 runs 60 ms on the device and sends 1 kB. Exit 0: device-only 20 ms.
OPTS = [
    _opt(1, None, 100.0),
    _opt(1, 0, 0.0, 5.0, 10_000),
    _opt(1, 4, 60.0, 2.0, 1_000),
    _opt(0, None, 20.0),
    _opt(0, 0, 0.0, 1.0, 10_000),
]


def test_plan_picks_deepest_exit_with_fastest_partition_when_bandwidth_is_high():
    p = planner.plan(OPTS, 100e6, 50.0)  # 10 kB at 100 Mbps = 0.8 ms
    assert (p.option.exit_index, p.option.partition, p.feasible) == (1, 0, True)
    assert p.predicted_ms == pytest.approx(5.0 + (10_000 + 40) * 8 / 100e6 * 1e3)


def test_plan_moves_the_cut_into_the_device_as_bandwidth_drops():
    # 1 Mbps: edge-only = 5 + 80.3 ms; p=4 = 60 + 2 + 8.3 = 70.3 ms; device-only 100 ms.
    p = planner.plan(OPTS, 1e6, 75.0)
    assert (p.option.exit_index, p.option.partition) == (1, 4)
    assert p.predicted_ms == pytest.approx(60 + 2 + 1040 * 8 / 1e6 * 1e3)


def test_plan_right_sizes_to_a_shallower_exit_when_no_partition_meets_the_deadline():
    p = planner.plan(OPTS, 1e6, 30.0)
    assert (p.option.exit_index, p.option.partition, p.feasible) == (0, None, True)


def test_plan_infeasible_returns_fastest_option_flagged():
    p = planner.plan(OPTS, 0.01e6, 5.0)
    assert not p.feasible and p.option.exit_index == 0 and p.option.partition is None
    assert p.predicted_ms == 20.0


def test_plan_margin_and_rtt_make_it_more_conservative():
    assert planner.plan(OPTS, 1e6, 75.0).option.partition == 4
    assert planner.plan(OPTS, 1e6, 75.0, margin=0.1).option.exit_index == 0
    assert planner.plan(OPTS, 1e6, 75.0, rtt_ms=6.0).option.exit_index == 0


def test_policies_restrict_the_candidates():
    allowed = {pol: planner.allowed(OPTS, pol) for pol in planner.POLICIES}
    assert [(o.exit_index, o.partition) for o in allowed["device-only"]] == [(1, None)]
    assert [(o.exit_index, o.partition) for o in allowed["edge-only"]] == [(1, 0)]
    assert {o.exit_index for o in allowed["neurosurgeon"]} == {1}
    assert all(o.partition is None for o in allowed["right-sizing"])
    assert planner.plan(allowed["neurosurgeon"], 1e6, 30.0).feasible is False
    with pytest.raises(planner.PlannerError, match="unknown policy"):
        planner.allowed(OPTS, "magic")
    with pytest.raises(planner.PlannerError):
        planner.plan(OPTS, 0.0, 10.0)


def test_bandwidth_estimator_ewma_drop_at_once_rise_after_confirmation():
    est = BandwidthEstimator(alpha=0.5, threshold=2.0, confirm_rise=2)
    est, ch = est.observe(10e6)
    assert est.estimate_bps == 10e6 and not ch
    est, ch = est.observe(12e6)
    assert est.estimate_bps == pytest.approx(11e6) and not ch
    est, ch = est.observe(1e6)  # sharp drop: trusted at once
    assert ch and est.estimate_bps == 1e6
    est, ch = est.observe(5e6)  # one high sample is not enough
    assert not ch and est.estimate_bps == 1e6
    est, ch = est.observe(6e6)
    assert ch and est.estimate_bps == 5e6 and est.changes == 2
    same, ch = est.observe(float("nan"))
    assert same is est and not ch


def test_compute_drift_learns_each_side_from_its_calls_and_rescales_the_plan():
    d = planner.ComputeDrift(alpha=0.5)
    d = d.observe("device", 10.0, 30.0)  # 3x slower: the EWMA moves from the prior 1.0
    assert d.device == pytest.approx(2.0) and d.edge == 1.0 and d.samples == (1, 0)
    d = d.observe("device", 10.0, 30.0)
    assert d.device == pytest.approx(2.5)
    d = d.observe("edge", 4.0, 2.0)
    assert d.edge == pytest.approx(0.75) and d.samples == (2, 1)
    # Not samples: a tiny or non-finite prediction, a NaN / negative measurement.
    for pred, meas in ((0.01, 5.0), (float("nan"), 5.0), (5.0, float("nan")), (5.0, -1.0),
                       (float("inf"), 5.0), (5.0, float("inf"))):  # fmt: skip
        assert d.observe("device", pred, meas) is d
    # A hostile or broken report cannot push a factor beyond the clamp.
    far = planner.ComputeDrift(alpha=1.0).observe("edge", 1.0, 1e9)
    assert far.edge == far.hi
    with pytest.raises(ValueError, match="side"):
        d.observe("phone", 1.0, 1.0)
    # The options' compute is scaled, nothing else.
    scaled = d.scaled(OPTS)
    for o, s in zip(OPTS, scaled):
        assert s.device_ms == pytest.approx(o.device_ms * d.device)
        assert s.edge_ms == pytest.approx(o.edge_ms * d.edge)
        assert (s.up_bytes, s.partition, s.exit) == (o.up_bytes, o.partition, o.exit)
    # At 1 Mbps and 75 ms the profile's plan is exit 1 cut at 4 (60 + 2 + 8.3 ms); a device
    # found 1.2x slower makes that 82.3 ms, so the plan falls back to exit 0 on the device.
    before = planner.plan(OPTS, 1e6, 75.0)
    slow = planner.ComputeDrift(alpha=1.0).observe("device", 10.0, 12.0)
    after = planner.plan(slow.scaled(OPTS), 1e6, 75.0)
    assert (before.option.exit_index, before.option.partition) == (1, 4)
    assert (after.option.exit_index, after.option.partition, after.feasible) == (0, None, True)
    assert after.predicted_ms == pytest.approx(20.0 * 1.2)


def test_config_map_is_the_plan_at_each_state_lower_edge():
    states = [0.1e6, 1e6, 10e6, 100e6]
    cmap = planner.config_map(OPTS, 75.0, states=states)
    assert [(o.exit_index, o.partition) for _, o in cmap] == [(0, None), (1, 4), (1, 0), (1, 0)]
    assert planner.lookup(cmap, 3e6).partition == 4  # in the [1, 10) Mbps state
    assert planner.lookup(cmap, 0.01e6) is cmap[0][1]
    edges = planner.bandwidth_states(50e3, 10e6, per_decade=4)
    assert edges[0] == 50e3 and edges[-1] >= 10e6 and np.all(np.diff(edges) > 0)


def test_latency_model_variables_and_fused_free_layers():
    conv = {"kind": "conv", "in_shape": [14, 14, 32], "out_shape": [7, 7, 64],
            "kernel": [3, 3], "stride": [2, 2], "features": 64}  # fmt: skip
    v = lm.raw_variables(conv)
    assert v["x1"] == 14 * 14 * 32 and v["x2"] == (9 / 4) * 64
    dense = {"kind": "dense", "in_shape": [2048], "out_shape": [192], "features": 192}
    assert lm.raw_variables(dense) == {"x1": 2048.0, "x2": 192.0, "x1x2": 2048.0 * 192}
    model = {
        "overhead_ms": 0.01,
        "kinds": {
            "conv": {"variables": ["x1", "x2"], "coef": [1e-4, 1e-2], "intercept": 0.1},
            "dense": {"variables": ["x1x2"], "coef": [1e-6], "intercept": 0.0},
            "relu": {"variables": ["x"], "coef": [1e-3], "intercept": 0.0},
        },
        "loading": {"variables": ["x"], "coef": [1e-6], "intercept": 2.0},
    }
    lm.check(model)
    relu = {"kind": "relu", "in_shape": [7, 7, 64], "out_shape": [7, 7, 64]}
    rows = [conv, {**relu, "fused": True}, relu,
            {"kind": "flatten", "in_shape": [7, 7, 64], "out_shape": [3136]}]  # fmt: skip
    want = 0.01 + (0.1 + 1e-4 * 6272 + 1e-2 * 144) + 0.0 + 1e-3 * 3136 + 0.0
    assert lm.signature_ms(model, rows) == pytest.approx(want)
    assert lm.loading_ms(model, 1e6) == pytest.approx(3.0)
    with pytest.raises(lm.LatencyModelError, match="lrn"):
        lm.layer_ms(model, {"kind": "lrn", "in_shape": [1], "out_shape": [1]})
    with pytest.raises(lm.LatencyModelError):
        lm.check({"overhead_ms": 0, "kinds": {"relu": {"variables": ["x"], "coef": [float("nan")],
                                                        "intercept": 0}}})  # fmt: skip


def test_oip_request_round_trips_every_encoding():
    x = np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32)
    for enc in (Encoding(), Encoding("float16"), calibrate("int8", [x])):
        wire = oip.infer_request("m", x, enc, request_id="7", digest="d").SerializeToString()
        req = oip.parse("ModelInfer", wire)
        assert oip.check_request(req) == {oip.DIGEST: "d"}
        y, got = oip.read_input(req, (1, 3, 4))
        assert got == enc and y.dtype == np.float32
        np.testing.assert_array_equal(y, enc.roundtrip(x))  # exactly what the device sent
        assert len(req.raw_input_contents[0]) == enc.nbytes(x.shape)


def reply_mutations():
    """Every way a reply can be wrong, each with what the client must say."""

    def params(**kw):
        def f(r):
            for k, v in kw.items():
                if v is None:
                    r.parameters.pop(k)
                elif isinstance(v, str):
                    r.parameters[k].string_param = v
                elif isinstance(v, bool):
                    r.parameters[k].bool_param = v
                else:
                    r.parameters[k].double_param = v

        return f  # fmt: skip

    yield "another bundle", params(bundle_digest="e" * 64), "serves another bundle"
    yield "no digest", params(bundle_digest=None), "serves another bundle"
    yield "other model", lambda r: setattr(r, "model_name", "edge_3_p02"), "reply for"
    yield "other id", lambda r: setattr(r, "id", "8"), "reply for"
    for ms in (None, -1.0, float("nan"), float("inf"), 1e7, True, "3"):
        yield f"server_ms {ms!r}", params(server_ms=ms), "server_ms"
    yield (
        "no output",
        lambda r: (r.ClearField("outputs"), r.ClearField("raw_output_contents")),
        "one output",
    )
    yield "two outputs", lambda r: r.raw_output_contents.append(b""), "one output"
    yield "output renamed", lambda r: setattr(r.outputs[0], "name", "x"), "unexpected output"
    yield "FP16 output", lambda r: setattr(r.outputs[0], "datatype", "FP16"), "unexpected output"
    yield "shape", lambda r: r.outputs[0].shape.append(1), "unexpected output"
    yield "bytes short", lambda r: r.raw_output_contents.__setitem__(0, b"\0" * 39), "bytes"
    yield "NaN", lambda r: r.raw_output_contents.__setitem__(
        0, np.full((1, 10), np.nan, np.float32).tobytes()), "NaN"  # fmt: skip


def test_oip_reply_check_refuses_every_malformation():
    req = oip.infer_request("edge_final_p00", np.zeros((1, 4), np.float32), request_id="7",
                            digest="d" * 64)  # fmt: skip
    y = np.arange(10, dtype=np.float32).reshape(1, 10)

    def reply():
        return oip.infer_response(req, y, digest="d" * 64, server_ms=0.5)

    kw = {"model": "edge_final_p00", "request_id": "7", "digest": "d" * 64, "shape": (1, 10)}
    got, ms = oip.read_output(reply(), **kw)
    assert np.array_equal(got, y) and ms == 0.5
    cases = list(reply_mutations())
    assert len(cases) == 18
    for name, mutate, match in cases:
        r = reply()
        mutate(r)
        with pytest.raises(oip.ProtocolError, match=match):
            oip.read_output(r, **kw)
            pytest.fail(name)


def test_oip_header_and_parameter_limits_are_protocol_errors():
    oip.check_metadata([("authorization", "Bearer t")] * oip.MAX_METADATA_ENTRIES)
    for md in ([("a", "b")] * (oip.MAX_METADATA_ENTRIES + 1),
               [("x-big", "v" * oip.MAX_METADATA_BYTES)]):  # fmt: skip
        with pytest.raises(oip.ProtocolError):
            oip.check_metadata(md)
    assert oip.token_of(oip.bearer("s")) == "s"
    assert oip.token_of([("authorization", "s")]) is None  # not a bearer token
    for n in range(oip.MAX_PARAMS + 1, oip.MAX_PARAMS + 40, 7):
        r = oip.infer_request("m", np.zeros((1, 2), np.float32))
        for i in range(n):
            r.parameters[f"p{i}"].int64_param = i
        with pytest.raises(oip.ProtocolError, match="parameters exceed"):
            oip.check_request(r)


def test_rpc_timeouts_are_clamped_for_any_float():
    for t, want in ((float("nan"), 1e-3), (-1.0, 1e-3), (0.0, 1e-3), (1e-300, 1e-3),
                    (0.5, 0.5), (1e300, MAX_CALL_S), (float("inf"), MAX_CALL_S)):  # fmt: skip
        assert clamp_timeout(t) == want


def test_link_at_a_tiny_bandwidth_waits_out_the_timeout_then_fails():
    link = Link([0.0], [1e-12], "tiny")
    for limit in (0.02, float("nan"), -5.0):
        with pytest.raises(EdgeFailure, match="over the"):
            link.transmit(1000, limit)  # returns (raises) after the clamped limit
    Link([0.0], [1e12], "huge").transmit(10**6, 1.0)  # effectively instantaneous: no error


def test_link_constant_and_trace_parsing(tmp_path):
    assert Link.parse("2.5").bandwidth_bps() == 2.5e6
    trace = tmp_path / "t.csv"
    trace.write_text("t_s,mbps\n0,10\n0.5,0.1\n")
    link = Link.parse(str(trace))
    assert link.bandwidth_bps() == 10e6
    link.t0 -= 1.0  # one second later
    assert link.bandwidth_bps() == 0.1e6
    for text, match in (
        ("t_s,mbps\n1,10\n", "start at t_s = 0"),
        ("0,10\n0,5\n", "increase"),
        ("0,10\n1,0\n", "mbps > 0"),
        ("0,10\n1,x\n", "line 2"),
        ("0,10,3\n", "line 1"),
    ):
        trace.write_text(text)
        with pytest.raises(ValueError, match=match):
            Link.parse(str(trace))
    with pytest.raises(FileNotFoundError):
        Link.parse(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError):
        Link.parse("-3")


# -- cut-tensor encodings in the plan ----------------------------------------------------------

F32, F16, I8 = Encoding(), Encoding("float16"), Encoding("int8", 0.05, -128)


def _enc_opts():
    """One exit: device-only 100 ms; a cut at p=4 (10 kB as float32) in each encoding, whose
    accuracy is the exit's 0.90 adjusted by a measured effect: float16 lossless, int8 -0.02."""
    cut = [
        Option("final", 0, 4, "d", "e", 10.0, 2.0, enc.nbytes((2500,)), 40, 0.0, enc, acc, agree)
        for enc, acc, agree in ((F32, 0.90, 1.0), (F16, 0.90, 1.0), (I8, 0.88, 0.97))
    ]
    return [Option("final", 0, None, "e", None, 100.0, 0.0, 0, 0, 0.0, F32, 0.90, 1.0), *cut]


def test_plan_picks_int8_when_only_int8_meets_the_deadline_at_low_bandwidth():
    # 1 Mbps: float32 10 kB = 80 ms, float16 = 40 ms, int8 2.5 kB = 20 ms (+ 12 ms compute).
    p = planner.plan(_enc_opts(), 1e6, 40.0)
    assert p.feasible and p.option.encoding == I8 and p.option.label() == "final@p=4+int8"
    assert p.option.up_bytes == 2500 and p.option.accuracy == pytest.approx(0.88)
    assert p.predicted_ms == pytest.approx(12.0 + (2500 + 40) * 8 / 1e6 * 1e3)
    # Baselines keep float32: neurosurgeon cannot use the int8 cut and misses.
    ns = planner.allowed(_enc_opts(), "neurosurgeon")
    assert {o.encoding.name for o in ns} == {"float32"}
    assert planner.plan(ns, 1e6, 40.0).feasible is False


def test_baselines_send_the_input_losslessly_and_interior_cuts_as_float32():
    # Edge-only input (p=0, 30 kB as float32): int8 = the uint8 frame (no effect), float16
    # lossy on one exit; an interior int8 cut stays Edgent's.
    u8 = Encoding("int8", 1 / 255, -128)

    def inp(exit_name, i, enc, acc, agree):
        return Option(exit_name, i, 0, None, "e", 0.0, 5.0, enc.nbytes((7500,)), 40, 0.0, enc,
                      acc, agree)  # fmt: skip

    opts = [
        inp("exit_1", 0, F32, 0.5, 1.0), inp("exit_1", 0, F16, 0.49, 0.99),
        inp("exit_1", 0, u8, 0.5, 1.0),
        inp("final", 1, F32, 0.9, 1.0), inp("final", 1, F16, 0.9, 1.0),
        inp("final", 1, u8, 0.88, 1.0),  # agrees on top-1 yet loses accuracy: not lossless
        *[dataclasses.replace(o, exit_index=1) for o in _enc_opts()],
    ]  # fmt: skip
    edge_only = planner.allowed(opts, "edge-only")
    assert [(o.exit, o.encoding.name, o.up_bytes) for o in edge_only] == [
        ("final", "float16", 15000)
    ]
    ns = planner.allowed(opts, "neurosurgeon")
    assert {(o.partition, o.encoding.name) for o in ns} == {
        (0, "float16"),
        (4, "float32"),
        (None, "float32"),
    }
    base = planner.baseline_encodings(opts)
    assert ("exit_1", 0, "int8") in {(o.exit, o.partition, o.encoding.name) for o in base}
    # Edgent itself sees every encoding.
    assert len(planner.allowed(opts, "edgent")) == len(opts)
    # No measured encodings: float32 everywhere.
    assert planner.baseline_encodings([opts[0], opts[3]]) == [opts[0], opts[3]]


def test_plan_picks_float32_when_bandwidth_is_ample_and_no_encoding_is_more_accurate():
    p = planner.plan(_enc_opts(), 1000e6, 40.0)
    # float16 is as accurate and agrees as well: equal merit, so the lower latency wins.
    assert p.option.encoding == F16
    assert p.option.label() == "final@p=4+float16"
    lossy16 = [dataclasses.replace(o, agreement=0.999) if o.encoding == F16 else o
               for o in _enc_opts()]  # fmt: skip
    p = planner.plan(lossy16, 1000e6, 40.0)
    assert p.option.encoding == F32 and p.option.label() == "final@p=4"
    # Accuracy first: at 1 Mbps with a 60 ms deadline float16 (52 ms) beats int8 (32 ms).
    assert planner.plan(_enc_opts(), 1e6, 60.0).option.encoding == F16


def test_plan_without_measured_accuracy_ranks_by_exit_depth_then_latency():
    opts = [dataclasses.replace(o, accuracy=None) for o in _enc_opts()]
    assert planner.plan(opts, 1e6, 40.0).option.encoding == I8  # the only feasible one
    # All as deep: the most faithful (agreement 1.0), then the fastest of those.
    assert planner.plan(opts, 1000e6, 40.0).option.encoding == F16


def test_encodings_filter_and_label_split_and_unknown_encoding_is_an_error():
    assert {o.encoding.name for o in planner.with_encodings(_enc_opts(), ["float32"])} == {
        "float32"
    }
    assert len(planner.with_encodings(_enc_opts(), ["int8"])) == 2  # device-only stays
    assert planner.split_label("final@p=4+int8") == ("final@p=4", "int8")
    assert planner.split_label("final@edge-only") == ("final@edge-only", "float32")
    with pytest.raises(planner.PlannerError, match="unknown encoding 'int4'"):
        planner.with_encodings(_enc_opts(), ["int4"])


# -- the emulated device's virtual clock --------------------------------------------------------


def _spin(cpu_s: float) -> None:
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def test_virtual_device_charges_slowdown_times_cpu_and_nothing_for_waiting():
    dev = Target.parse("local:threads=1:slowdown=10")
    assert dev.clock == "virtual" and dev.emulated
    _, waited = dev.measure(time.sleep, 0.05)  # no CPU: a dedicated device does not wait
    assert waited < 0.05
    _, busy = dev.measure(_spin, 0.02)
    assert busy >= 10 * 0.02 * 0.999
    clock = Timeline()
    t0 = clock.now()
    clock.measure(dev, _spin, 0.02)
    assert clock.now() - t0 >= 10 * 0.02 * 0.999  # the frame clock advanced by device time
    edge = Target.parse("local:threads=1")
    assert not edge.emulated and edge.measure(time.sleep, 0.02)[1] >= 0.02  # wall time
    assert Target.parse("local:slowdown=4:clock=sleep").clock == "sleep"
    for bad in ("local:clock=atomic", "local:slowdown=0.5", "local:speed=2"):
        with pytest.raises(ValueError, match="bad target option"):
            Target.parse(bad)


def test_figures_plot_plans_that_name_their_cut_encoding(tmp_path):
    from export import edgent_figures  # lazy: matplotlib, for this test only

    def run(plans, policy="edgent", deadline=10.0, bw="1.0"):
        return {"plans": plans, "policy": policy, "deadline_ms": deadline, "bandwidth": bw,
                "predicted_mean_ms": 5.0, "mean_ms": 6.0, "effective_accuracy": 0.9}  # fmt: skip

    rep = {
        "deadline_ms": 10.0, "bandwidth_mbps": 1.0, "exits": ["exit_3", "final"],
        "policies": ["edgent"], "deadlines": [10.0],
        "bandwidth": [run({"final@p=4+int8": 7, "exit_3@device-only": 1}, bw="0.5"),
                      run({"final@edge-only+float16": 8}, bw="10")],
        "deadline": [run({"final@p=4": 8})], "trace": {},
    }  # fmt: skip
    paths = edgent_figures.plot(rep, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["edgent_bandwidth.png", "edgent_deadline.png"]


def test_bench_compares_an_interior_cut_with_both_ends_at_its_exit():
    from runtime import edgent_bench

    assert edgent_bench.interior("final@p=12+float16") == ("final", 12)
    assert edgent_bench.interior("exit_7@p=8") == ("exit_7", 8)
    for label in ("final@device-only", "final@edge-only+int8", "-"):
        assert edgent_bench.interior(label) is None

    def run(plan, ms):
        return {"plans": {plan: 40}, "mean_ms": ms, "fallbacks": 0}

    cut = run("final@p=12+float16", 40.0)
    w = edgent_bench.same_exit(cut, run("final@device-only", 52.0), run("final@edge-only", 70.0))
    assert w["exit"] == "final" and w["wins"] and w["edge_only_plan"] == "final@edge-only"
    w = edgent_bench.same_exit(cut, run("final@device-only", 39.0), run("final@edge-only", 70.0))
    assert not w["wins"]  # measured, the device alone was faster


def test_probe_lasts_about_20_ms_at_the_estimate_within_its_bounds():
    from runtime.coinfer import MAX_PROBE_BYTES, probe_size

    assert probe_size(None, 1024) == 1024  # nothing known yet: the floor
    assert probe_size(float("nan"), 1024) == 1024 and probe_size(0.0, 1024) == 1024
    assert probe_size(0.1e6, 1024) == 1024  # 0.1 Mbps: 250 B would do; the floor holds
    assert probe_size(20e6, 1024) == 50_000  # 20 ms at 20 Mbps
    assert probe_size(1e9, 1024) == MAX_PROBE_BYTES
    assert probe_size(1e9, 10 * MAX_PROBE_BYTES) == 10 * MAX_PROBE_BYTES  # an explicit floor
