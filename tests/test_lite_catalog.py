"""The EfficientNet-Lite catalog job (train.lite_catalog) on its smoke config, and its refusals."""

from __future__ import annotations

import itertools
import json
import os
import textwrap

import numpy as np
import pytest

from export import quantize

from conftest import ROOT, run_job

CONFIG = os.path.join(ROOT, "configs", "clips_lite_catalog.py")


@pytest.fixture(scope="module")
def smoke_catalog(tmp_path_factory) -> tuple[str, str]:
    """The smoke catalog, built once by the real command line; ``(workdir, stdout)``."""
    workdir = str(tmp_path_factory.mktemp("lite_catalog") / "w")
    proc = run_job(
        "train.lite_catalog", f"--config={CONFIG}:smoke", f"--workdir={workdir}", "--threads=1",
        check=True, timeout=900,  # three Lite0 compiles: over 300 s at load 13 on 2 cores
    )  # fmt: skip
    return workdir, proc.stdout


def _catalog(workdir: str) -> dict:
    with open(os.path.join(workdir, "catalog.json")) as f:
        return json.load(f)


def test_lite_catalog_smoke_rows_verify_and_quantized_files_are_smaller(smoke_catalog):
    from flexjax.io import sha256_file

    workdir, stdout = smoke_catalog
    cat = _catalog(workdir)
    every = cat["tasks"]["imagenet"]["variants"]
    assert [r["name"] for r in every] == [
        "lite0_64_fp32", "lite0_64_int8", "lite0_64_mixed4", "lite0_64_epmp_fp32",
        "lite0_64_epmp_int8",
    ]  # fmt: skip
    rows = [r for r in every if "approx" not in r]
    assert cat["tasks"]["imagenet"]["original"] == rows[0]["name"]
    for r in rows:
        path = os.path.join(workdir, r["file"])
        assert r["bytes"] == os.path.getsize(path) and r["sha256"] == sha256_file(path)
        assert r["name"] in stdout  # the printed table covers every row
    fp32 = rows[0]["bytes"]
    by_name = {r["weights"]: r for r in rows}
    # int8 weights (converter) and 4/8-bit weights (litert-quantizer): well under half of fp32.
    assert by_name["int8"]["bytes"] < fp32 / 2
    assert by_name["mixed4"]["bytes"] < fp32 / 2
    # Same network, same resolution: same parameter and FLOP counts for every weight format.
    assert len({(r["params"], r["flops"]) for r in rows}) == 1 and rows[0]["params"] > 1e6


def test_lite_catalog_smoke_agreement_comes_from_the_litert_runs(smoke_catalog):
    from pipelines import lite_catalog
    from runtime.lite import Model

    workdir, _ = smoke_catalog
    cat = _catalog(workdir)
    rows = cat["tasks"]["imagenet"]["variants"]
    config = _smoke_config()
    data = lite_catalog.load_frames(config, [64], need_calibration=False)
    labels = data["labels"]
    assert len(labels) == cat["data"]["test_frames"] == len(rows[0]["top1"]) > 0
    orig = np.asarray(rows[0]["top1"])
    for r in rows:
        top1 = np.asarray(r["top1"])
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement_original"] <= 1.0
        assert r["accuracy"] == pytest.approx(float(np.mean(top1 == labels)))
        assert r["agreement_original"] == pytest.approx(float(np.mean(top1 == orig)))
        assert r["accuracy_drop_points"] == pytest.approx(
            100 * (rows[0]["accuracy"] - r["accuracy"])
        )
        # The recorded top-1 is what the exported file gives in LiteRT on the test frames.
        sig = Model(os.path.join(workdir, r["file"])).signature("full")
        again = [int(np.argmax(sig(np.ascontiguousarray(x[None])))) for x in data["test"][64]]
        assert again == r["top1"]
    assert rows[0]["agreement_original"] == 1.0


def test_lite_catalog_smoke_is_readable_by_the_ams_runtime_and_targets_match_rows(smoke_catalog):
    from runtime.ams.catalog import load_catalog

    workdir, _ = smoke_catalog
    cat = _catalog(workdir)
    rows = cat["tasks"]["imagenet"]["variants"]
    loaded = load_catalog(workdir)
    opts = {o.variant: o for o in loaded.options["imagenet"]}
    assert set(opts) == {r["name"] for r in rows}
    for r in rows:
        o = opts[r["name"]]
        assert o.mem_bytes == r["bytes"] and o.latency_ms == r["latency_ms"] > 0
        assert o.load_ms == r["load_ms"] > 0 and o.energy_j > 0
        assert r["latency_ratio"] == pytest.approx(rows[0]["latency_ms"] / r["latency_ms"])
        assert r["memory_ratio"] == pytest.approx(rows[0]["bytes"] / r["bytes"])
    for key, t in cat["targets"].items():
        ok = [r for r in rows[1:] if r["accuracy_drop_points"] <= t["max_drop_points"]]
        assert t["met"] == any(r[key] >= t["target"] for r in ok)


def test_lite_catalog_rerun_reuses_every_variant(smoke_catalog):
    workdir, _ = smoke_catalog
    before = {r["name"]: r["sha256"] for r in _catalog(workdir)["tasks"]["imagenet"]["variants"]}
    proc = run_job(
        "train.lite_catalog", f"--config={CONFIG}:smoke", f"--workdir={workdir}", "--threads=1",
        check=True,
    )  # fmt: skip
    assert all(f"{n}: reused" in proc.stdout for n in before), proc.stdout
    after = {r["name"]: r["sha256"] for r in _catalog(workdir)["tasks"]["imagenet"]["variants"]}
    assert after == before


def test_lite_catalog_smoke_approximated_variants_really_shrink_and_were_distilled(smoke_catalog):
    """Expansion pruning + low-rank classifier + magnitude pruning: smaller shapes, sparse file."""
    from runtime.lite import Model

    workdir, _ = smoke_catalog
    cat = _catalog(workdir)
    rows = {r["name"]: r for r in cat["tasks"]["imagenet"]["variants"]}
    orig, fp32, int8 = rows["lite0_64_fp32"], rows["lite0_64_epmp_fp32"], rows["lite0_64_epmp_int8"]
    assert fp32["approx"] == int8["approx"] == "epmp"
    assert fp32["params"] < 0.8 * orig["params"] and fp32["flops"] < orig["flops"]
    assert fp32["bytes"] < orig["bytes"] and int8["bytes"] < rows["lite0_64_int8"]["bytes"]
    assert list(fp32["ranks"]) == ["layer_25"] and fp32["ranks"]["layer_25"] < 1000  # classifier
    assert 0.2 < fp32["kernel_zero_fraction"] < 0.6 and fp32["sparse_export"]
    ft = fp32["finetune"]
    assert ft["steps"] == 2 and np.isfinite([ft["loss_first"], ft["loss_last"]]).all()
    assert "inference mode" in ft["bn"]
    assert 0.0 <= fp32["agreement_original"] <= 1.0 and fp32["bytes_gzip"] < fp32["bytes"]
    # In LiteRT: the depthwise weights of a pruned block have fewer channels (multiples of 8).
    m = Model(os.path.join(workdir, fp32["file"]))
    o = Model(os.path.join(workdir, orig["file"]))

    def dw_channels(model):
        interp = model.interpreter
        out = []
        for op in interp._get_ops_details():
            if op["op_name"] == "DEPTHWISE_CONV_2D":
                out.append(int(interp._get_tensor_details(op["inputs"][1], 0)["shape"][-1]))
        return out

    pruned, full = dw_channels(m), dw_channels(o)
    assert len(pruned) == len(full)
    assert pruned[0] == full[0]  # the first block has no expansion conv: untouched
    assert all(p <= f for p, f in zip(pruned, full)) and sum(pruned) < 0.6 * sum(full)
    assert all(p % 8 == 0 for p, f in zip(pruned, full) if p < f)


def _smoke_config():
    from flexjax import config as config_lib

    return config_lib.validate(config_lib.load(f"{CONFIG}:smoke"), config_lib.lite_catalog_defaults)


# --- bad input: one error line, non-zero exit, nothing written --------------------------------

_BAD = {
    "unknown_weights": ('c.weights = ("fp32", "int3")', "unknown weights 'int3'"),
    "int4_blockwise_conv": (
        'c.recipes = [{"name": "q", "rules": [{"op": "CONV_2D", "bits": 4, '
        '"granularity": "blockwise_32", "mode": "dynamic"}]}]; c.weights = ("q",)',
        "does not support dynamic int4 blockwise_32 weights on CONV_2D",
    ),
    "unknown_mode": (
        'c.recipes = [{"name": "q", "rules": [{"op": "CONV_2D", "bits": 4, '
        '"granularity": "channelwise", "mode": "fancy"}]}]',
        "unknown mode 'fancy'",
    ),
    "resolution_above_frames": ("c.resolutions = (128,)", "resolution 128 px is out of range"),
    "resolution_below_domain": ("c.resolutions = (16,)", "config key 'resolutions'"),
    "original_resolution_huge": ("c.original.resolution = 5000", "original.resolution"),
    "unknown_model": ('c.originals = ("efficientnet_b7",)', "unknown model 'efficientnet_b7'"),
    "extra_without_weights": (
        'c.extras = [{"model": "efficientnet_lite0", "resolution": 64}]',
        "extras[0] must be",
    ),
    "approx_missing_layer": (
        'c.approximations = [{"name": "epmp", "steps": [{"technique": "low_rank_1x1", '
        '"ranks": {"layer_99/branch_0/layer_00": 4}}]}]',
        "no layer layer_99",
    ),
    "approx_missing_block_layer": (
        'c.approximations = [{"name": "epmp", "steps": [{"technique": "low_rank_1x1", '
        '"ranks": {"layer_05/branch_0/layer_42": 4}}]}]',
        "has only 8 layers",
    ),
    "approx_not_a_block": (
        'c.approximations = [{"name": "epmp", "steps": [{"technique": "prune_expansion", '
        '"keep": 0.5, "sites": ["layer_01"]}]}]',
        "is not an MBConv block",
    ),
    "approx_rank_above_full": (
        'c.approximations = [{"name": "epmp", "steps": [{"technique": "low_rank_1x1", '
        '"ranks": {"layer_05/branch_0/layer_00": 17}}]}]',
        "rank 17 is larger than the layer allows",
    ),
    "approx_keep_nan": (
        'c.approximations = [{"name": "epmp", "steps": [{"technique": "prune_expansion", '
        '"keep": float("nan")}]}]',
        "expansion keep fraction must be in (0, 1]",
    ),
    "approx_unknown_technique": (
        'c.approximations = [{"name": "epmp", "steps": [{"technique": "svd_magic"}]}]',
        "unknown technique 'svd_magic'",
    ),
    "approx_unknown_name": (
        'c.extras = [{"model": "efficientnet_lite0", "resolution": 64, "weights": "fp32", '
        '"approx": "nope"}]',
        "unknown approximation 'nope'",
    ),
    "int4_depthwise": (
        'c.recipes = [{"name": "q", "rules": [{"op": "DEPTHWISE_CONV_2D", "bits": 4, '
        '"granularity": "channelwise", "mode": "dynamic"}]}]; c.weights = ("q",)',
        "does not support dynamic int4 channelwise weights on DEPTHWISE_CONV_2D",
    ),
    "finetune_unknown_optimizer": (
        'c.finetune.optimizer = "rmsprop"',
        "finetune.optimizer must be one of sgd, adam",
    ),
    "finetune_resolution_too_small": ("c.finetune.resolution = 16", "finetune.resolution 16 px"),
    "finetune_without_val_clips": ('c.clips.val = ""', "needs clips.val"),
    "finetune_clip_norm_negative": ("c.finetune.clip_norm = -1.0", "finetune.clip_norm"),
    "val_clip_also_in_test": ('c.clips.val = "carphone"', "'carphone' is in ClipConfig.val"),
    # Sensitivity-chosen approximations (issue 15, item 1): budgets and settings.
    **{
        f"sensitivity_budget_{name}": (
            f'c.approximations = [*c.approximations, {{"name": "s", "sensitivity": '
            f'{{"budget_pts": {value}}}}}]',
            "sensitivity.budget_pts must be a finite number in (0, 100]",
        )
        for name, value in (
            ("zero", "0.0"),
            ("negative", "-2.0"),
            ("nan", 'float("nan")'),
            ("inf", 'float("inf")'),
        )
    },  # fmt: skip
    "sensitivity_unknown_key": (
        'c.approximations = [*c.approximations, {"name": "s", "sensitivity": {"budjet": 2}}]',
        "unknown sensitivity settings ['budjet']",
    ),
    "sensitivity_unknown_metric": (
        'c.approximations = [*c.approximations, {"name": "s", "sensitivity": {"metric": "top5"}}]',
        "sensitivity.metric must be one of reference, original",
    ),
    "sensitivity_keep_one": (
        'c.approximations = [*c.approximations, {"name": "s", "sensitivity": {"keeps": [1.0]}}]',
        "sensitivity.keeps: 1.0 is not a fraction in (0, 1)",
    ),
    "sensitivity_on_another_model": (
        'c.approximations = [*c.approximations, {"name": "s", "sensitivity": {}}]; '
        'c.extras = [{"model": "efficientnet_lite1", "resolution": 64, "weights": "fp32", '
        '"approx": "s"}]',
        "sensitivity approximation 's' is chosen on the original",
    ),
    "sensitivity_without_val_clips": (
        'c.approximations = [*c.approximations, {"name": "s", "sensitivity": {}}]; '
        'c.extras = [{"model": "efficientnet_lite0", "resolution": 64, "weights": "fp32", '
        '"approx": "s"}]; c.finetune.steps = 0; c.clips.val = ""',
        "a sensitivity approximation needs clips.val",
    ),
    "unknown_granularity": (
        'c.recipes = [{"name": "q", "rules": [{"op": "FULLY_CONNECTED", "bits": 4, '
        '"granularity": "blockwise_48", "mode": "dynamic"}]}]',
        "unknown granularity 'blockwise_48'",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_lite_catalog_bad_config_is_one_error_line_and_writes_nothing(case, tmp_path):
    change, message = _BAD[case]
    cfg = tmp_path / "bad.py"
    cfg.write_text(textwrap.dedent(f"""
        from configs.clips_lite_catalog import get_config as _smoke


        def get_config():
            c = _smoke("smoke")
            {change}
            return c
    """))  # fmt: skip
    workdir = tmp_path / "w"
    proc = run_job("train.lite_catalog", f"--config={cfg}", f"--workdir={workdir}", timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not workdir.exists()


def test_quantize_check_recipe_accepts_exactly_what_the_quantizer_policy_lists():
    """Every (op, mode, bits, granularity) over EfficientNet-Lite's ops: the policy decides."""
    n_ok = n_bad = 0
    for op, mode, bits, gran in itertools.product(
        ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD"), quantize.MODES,
        quantize.BITS, quantize.GRANULARITIES,
    ):  # fmt: skip
        rule = {"op": op, "bits": bits, "granularity": gran, "mode": mode}
        if f"{mode} int{bits} {gran}" in quantize.supported(op):
            assert quantize.check_recipe([rule]) == [rule]
            n_ok += 1
        else:
            with pytest.raises(quantize.QuantizeError, match="does not support") as e:
                quantize.check_recipe([rule])
            assert "\n" not in str(e.value)
            n_bad += 1
    # The quantizer's own policy: blockwise 4-bit only on FULLY_CONNECTED; nothing for ADD.
    assert "dynamic int4 blockwise_32" in quantize.supported("FULLY_CONNECTED")
    assert not any("blockwise" in s for s in quantize.supported("CONV_2D"))
    assert quantize.supported("ADD") == []
    assert n_ok > 10 and n_bad > 50


def test_quantize_int4_weight_only_runs_like_fp32_with_the_dequantized_weights(smoke_catalog):
    """LiteRT runs litert-quantizer's 4-bit weights faithfully: what changes is the weights."""
    from pipelines import lite_catalog
    from runtime.lite import Model

    workdir, _ = smoke_catalog
    with open(os.path.join(workdir, "variants", "lite0_64_fp32.tflite"), "rb") as f:
        fp32 = f.read()
    rule = {"op": "CONV_2D", "bits": 4, "granularity": "channelwise", "mode": "weight_only"}
    int4 = quantize.quantize(fp32, [rule], "w4")
    twin = quantize.dequantized_float_model(fp32, int4)
    assert len(int4) < len(fp32) / 2  # the 1x1 / 3x3 conv weights are most of Lite0
    frames = lite_catalog.load_frames(_smoke_config(), [64], need_calibration=False)["test"][64]
    outs = {}
    for name, buf in (("fp32", fp32), ("int4", int4), ("twin", twin)):
        sig = Model.from_bytes(buf).signature("full")
        outs[name] = np.concatenate([sig(np.ascontiguousarray(x[None])) for x in frames])
    scale = np.abs(outs["fp32"]).max()
    assert np.abs(outs["int4"] - outs["twin"]).max() <= 1e-4 * scale
    assert np.abs(outs["int4"] - outs["fp32"]).max() > 1e-2 * scale  # 4 bits do change things


# --- flexjax.approx on EfficientNet-Lite0 (pretrained weights, 32 px) -------------------------


@pytest.fixture(scope="module")
def lite0():
    from flexjax.models import pretrained

    net, variables = pretrained.load("efficientnet_lite0", 32)
    x = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
    return net, variables, x


def _logits(net, variables, x) -> np.ndarray:
    from flexjax.models.build import build

    return np.asarray(build(net).apply(variables, x)["final"])


def test_prune_expansion_drops_the_lowest_scoring_channels_and_shapes_shrink(lite0):
    """Channels whose projection rows are zero score 0 and go first: the output is unchanged."""
    from flexjax import approx, costs
    from flexjax.transforms import get_path, set_path

    net, v, x = lite0
    pos = 5  # block 5: 16 -> 96 expanded channels -> 24
    scores = approx.expansion_scores(net, v, pos)
    top = np.argsort(-scores)[:48]  # the 48 best channels: their projection rows zeroed
    path = ("layer_05", "branch_0", "layer_06", "kernel")
    k = np.asarray(get_path(v["params"], path)).copy()
    k[:, :, top, :] = 0.0
    zeroed = {**v, "params": set_path(v["params"], path, k)}
    p_net, p_v = approx.prune_expansion(net, zeroed, 0.5, sites=["layer_05"])
    block = p_v["params"]["layer_05"]["branch_0"]
    assert block["layer_00"]["kernel"].shape == (1, 1, 16, 48)
    assert block["layer_03"]["kernel"].shape == (3, 3, 1, 48)
    assert block["layer_06"]["kernel"].shape == (1, 1, 48, 24)
    assert p_v["batch_stats"]["layer_05"]["branch_0"]["layer_04"]["var"].shape == (48,)
    assert costs.of(p_net).backbone.params < costs.of(net).backbone.params
    want, got = _logits(net, zeroed, x), _logits(p_net, p_v, x)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # Every block at once: channel counts are multiples of 8, and the blocks without an
    # expansion conv (the first) are left alone.
    all_net, all_v = approx.prune_expansion(net, v, 0.3)
    for i, (a, b) in enumerate(zip(net.layers, all_net.layers)):
        if a.kind == "mbconv" and len(a.branches[0]) == 8:
            n = b.branches[0][0]["features"]
            assert n % 8 == 0 and n <= max(8, -(-0.3 * a.branches[0][0]["features"] // 8) * 8)
            assert b.branches[0][3]["groups"] == n
        else:
            assert a == b, i


def test_low_rank_1x1_full_rank_is_exact_and_the_energy_rule_is_minimal(lite0):
    from flexjax import approx
    from flexjax.transforms import get_path

    net, v, x = lite0
    full_net, full_v = approx.low_rank_1x1(net, v, fraction=1.0, only_if_smaller=False)
    sites = approx.lite_sites(net)
    assert sorted(approx.lite_ranks(full_net)) == sorted(sites) and len(sites) == 33
    want = _logits(net, v, x)
    assert np.abs(_logits(full_net, full_v, x) - want).max() <= 1e-4 * np.abs(want).max()
    lr_net, _ = approx.low_rank_1x1(net, v, energy=0.9)
    ranks = approx.lite_ranks(lr_net)
    assert 0 < len(ranks) < len(sites)
    for site in sites:
        k = np.asarray(get_path(v["params"], tuple(site.split("/")))["kernel"])
        m, n = int(np.prod(k.shape[:-1])), k.shape[-1]
        s2 = np.linalg.svd(k.reshape(m, n).astype(np.float64), compute_uv=False) ** 2
        kept = np.cumsum(s2) / s2.sum()
        r = int(np.searchsorted(kept, 0.9 - 1e-12) + 1)
        assert kept[r - 1] >= 0.9 - 1e-9 and (r == 1 or kept[r - 2] < 0.9)
        if site in ranks:  # factorized: the minimal rank, and the factors are smaller
            assert ranks[site] == r and r * (m + n) < m * n
        else:
            assert r * (m + n) >= m * n
    # Ranks rounded up to a multiple of 32 (blockwise-32 weight quantization of the factors).
    r32 = approx.lite_ranks(approx.low_rank_1x1(net, v, energy=0.8, rank_multiple=32)[0])
    assert r32 and all(r % 32 == 0 for r in r32.values())


def test_approx_lite_bad_sites_ranks_and_fractions_are_one_line_errors(lite0):
    """Generated cases: every site at rank 0 / full + 1, sites naming no layer, bad fractions."""
    from flexjax import approx
    from flexjax.transforms import get_path

    net, v, _ = lite0
    cases = []
    for site in approx.lite_sites(net)[::4]:
        k = get_path(v["params"], tuple(site.split("/")))["kernel"]
        full = min(int(np.prod(k.shape[:-1])), k.shape[-1])
        cases += [({"ranks": {site: full + 1}}, "larger than the layer allows"),
                  ({"ranks": {site: 0}}, "larger than the layer allows")]  # fmt: skip
    for site in ("layer_99/branch_0/layer_00", "layer_05/branch_1/layer_00",
                 "layer_05/branch_0/layer_08", "layer_02/branch_0/layer_00",
                 "layer_05/branchX/layer_00"):  # fmt: skip
        cases.append(({"ranks": {site: 1}}, f"site {site!r}"))
    cases.append(({"ranks": {"layer_05/branch_0/layer_03": 2}}, "ungrouped 1x1 convs"))
    for e in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        cases.append(({"energy": e}, "energy fraction must be in (0, 1]"))
    cases.append(({"energy": 0.9, "parts": ["stem"]}, "unknown parts"))
    cases.append(({"energy": 0.9, "fraction": 0.5}, "exactly one of"))
    for bad in (0, -32, 2.5, True):
        cases.append(({"energy": 0.9, "rank_multiple": bad}, "rank_multiple must be an int"))
    for kw, message in cases:
        with pytest.raises(approx.TransformError) as e:  # ApproxError's base class
            approx.low_rank_1x1(net, v, **kw)
        assert message in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    for keep in (0, -0.5, 1.5, float("nan"), float("inf"), True, "half"):
        with pytest.raises(approx.ApproxError, match="keep fraction"):
            approx.prune_expansion(net, v, keep)
    for sites in (["layer_01"], ["layer_04"], ["layer_99"]):  # not expansion blocks / missing
        with pytest.raises(approx.TransformError):
            approx.prune_expansion(net, v, 0.5, sites=sites)
    lr_net, lr_v = approx.low_rank_1x1(net, v, fraction=0.5, parts=["expand"])
    with pytest.raises(approx.ApproxError, match="prune the expansion before factorizing"):
        approx.prune_expansion(lr_net, lr_v, 0.5, sites=["layer_05"])
