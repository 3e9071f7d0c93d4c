"""The Backbone object and any timm CNN: the registered networks exactly as on main, timm stages
by output stride, trunk + suffix == model, freeze specs, weights files and timm's pretrained
weights without network, refusals in one line, features and the frozen-prefix cache.

timm networks here are small variants with random weights on tiny images; a Backbone reads its
layout on the meta device, so asking about one costs no compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.error

import pytest
import torch

from boatray import freezing, models
from boatray.backbones.backbone import Backbone
from boatray.config import FeaturesConfig, ModelConfig, SyntheticConfig, from_dict
from boatray.data import manifest as manifest_module
from boatray.data import synthetic
from boatray.data.images import decode_batch, normalize, to_chw
from boatray.errors import BoatrayError
from boatray.features import featurefile, pipeline
from boatray.finetune import checkpoints, loop, prefix_cache, trainer

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e .[timm])")

SIZE = (64, 96)  # every side a multiple of 32: stride-32 maps are 2x3
FAMILIES = ("timm/convnext_atto", "timm/regnetx_002", "timm/mobilenetv3_small_050",
            "timm/efficientnet_b0")


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def image_batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, *SIZE)


# ---------------------------------------------------------------- the registered networks

MAIN = {  # main at 0c0eec9, before the Backbone: models.build(name, "none", 5) after
    # torch.manual_seed(0); features and logits of image_batch(); digests of the state-dict
    # keys with shapes, of the pooled trunk's keys (the export format) and of the stage table
    "resnet18": {"keys": "89d23f8ee94e1d55", "trunk_keys": "7d835f094ab0b926", "width": 512,
                 "feature_sum": 466.5918905718572,
                 "logits": [0.26832, 0.151883, 0.091954, 0.15866, 0.452909],
                 "flops": 444142592, "table": "916c727e7eb90f90",
                 "prefix": ["pool", "layer3", "layer2", "layer1", "stem", None, None]},
    "efficientnet_lite0": {
        "keys": "153da924315c284a", "trunk_keys": "420afd441a2a20c9", "width": 1280,
        "feature_sum": 2526.696228334171,
        "logits": [-24.933336, 21.786289, -10.917776, 16.112007, -14.397463],
        "flops": 94030976, "table": "5cfb57195520c506",
        "prefix": ["pool", "stride16", "stride8", "stride4", "stem", None, None]},
    "bettercnn": {"keys": "7cfd84c492fea2b5", "trunk_keys": "abbf07dcc06bdb76", "width": 1725,
                  "feature_sum": 315.44464230134326,
                  "logits": [0.080333, -0.07094, -0.014712, 0.097671, 0.024662],
                  "flops": 35274100, "table": "93e854f4adcaf1f0", "prefix": None},
}


@pytest.mark.parametrize("name", list(MAIN))
def test_the_registered_networks_are_those_of_main(name):
    """Same state-dict keys, stage grouping, exported trunk keys, features and logits for a
    fixed seed, FLOPs and frozen prefixes as before the Backbone existed."""
    expected = MAIN[name]
    torch.manual_seed(0)
    model = models.build(name, "none", 5).eval()
    trunk = models.trunk(model, "pool")
    with torch.no_grad():
        features, logits = trunk(image_batch()), model(image_batch())
    assert digest([f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]) == (
        expected["keys"])
    assert digest(list(trunk.state_dict())) == expected["trunk_keys"]
    assert features.shape == (2, expected["width"]) == (2, models.backbone(name).feature_width)
    assert float(features.double().sum()) == pytest.approx(expected["feature_sum"], rel=1e-5)
    assert logits[0].tolist() == pytest.approx(expected["logits"], abs=1e-4)
    assert models.forward_flops(model, SIZE) == models.backbone(name).flops(SIZE, 5) == (
        expected["flops"])
    table = freezing.stage_table(name)
    assert hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16] == expected["table"]
    if expected["prefix"] is not None:
        assert [freezing.frozen_prefix(name, s) for s in freezing.FREEZE_SPECS] == (
            expected["prefix"])
    if name == "efficientnet_lite0":
        assert table[1]["modules"] == "blocks.5, blocks.6, conv_head, bn2, classifier"


def test_a_backbone_is_built_once_and_answers_without_building_a_network(monkeypatch,
                                                                         tmp_path):
    """Questions about a network (stages, FLOPs, weights, freeze specs, the report's table, a
    weights file's fit) never build it: the Backbone answers from its meta-device copy."""
    torch.save(models.build("resnet18", "none", 3).state_dict(), tmp_path / "weights.pth")
    torch.save(models.build("bettercnn", "none", 3).state_dict(), tmp_path / "other.pth")
    assert models.backbone("resnet18") is models.backbone("resnet18")
    monkeypatch.setattr(Backbone, "build", lambda *a, **k: pytest.fail("built a network"))
    backbone = models.backbone("resnet18")
    assert backbone.feature_width == 512 and backbone.head == "fc"
    assert freezing.describe("resnet18", "none")["stages"][0]["modules"] == "fc"
    assert freezing.frozen_prefix("resnet18", "last2") == "layer2"
    assert backbone.flops(SIZE, upto="layer2") < backbone.flops(SIZE)
    assert backbone.output_shape(SIZE, "layer3") == (256, 4, 6)
    backbone.check_weights(str(tmp_path / "weights.pth"))
    exp = from_dict({"model": {"name": "resnet18", "weights": "none"},
                     "data": {"image_size": list(SIZE)}, "train": {"freeze": "last1"}})
    assert prefix_cache.estimated_speedup(exp, "layer3", 4) > 2
    with pytest.raises(BoatrayError, match="other.pth does not fit resnet18"):
        backbone.check_weights(str(tmp_path / "other.pth"))


# ---------------------------------------------------------------- any timm CNN

@pytest.fixture(scope="module", params=FAMILIES)
def timm_model(request):
    torch.manual_seed(0)
    return request.param, models.build(request.param, "none", 5).eval()


def test_timm_stages_reduce_by_their_stride_and_compose_to_the_model(timm_model):
    name, model = timm_model
    backbone = models.backbone(name)
    assert backbone.cuts == ("stem", "stride4", "stride8", "stride16", "stride32", "pool")
    for stride in (4, 8, 16, 32):  # read on the meta device
        assert backbone.output_shape(SIZE, f"stride{stride}")[-2:] == (
            SIZE[0] // stride, SIZE[1] // stride), stride
    x = image_batch()[:1]
    with torch.no_grad():
        expected = model(x)
        for cut in backbone.cuts:
            assert torch.allclose(models.suffix(model, cut)(models.trunk(model, cut)(x)),
                                  expected, atol=1e-5), cut
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(models.trunk(model, "pool")(x), pooled, atol=1e-6)
    assert pooled.shape == (1, backbone.feature_width)
    assert models.trunk(model, "stride8")[-1] is model.get_submodule(
        backbone.layout["stride8"][-1])  # shares the model's modules


def test_modules_between_stages_and_around_pooling_land_where_timm_runs_them():
    """EfficientNet's conv_head/bn2 run before pooling (stride 32, as lite0's always did);
    ConvNeXt's head norm and MobileNetV3's conv_head run after it (pool), and train with the
    stride-32 stage; the head is get_classifier()."""
    layouts = {name: models.backbone(name).layout for name in FAMILIES}
    assert layouts["timm/efficientnet_b0"]["stride32"][-2:] == ("conv_head", "bn2")
    assert layouts["timm/efficientnet_b0"]["pool"] == ("global_pool",)
    assert "head.norm" in layouts["timm/convnext_atto"]["pool"]
    assert layouts["timm/convnext_atto"]["head"] == ("head.fc",)
    assert "conv_head" in layouts["timm/mobilenetv3_small_050"]["pool"]
    assert layouts["timm/regnetx_002"]["head"] == ("head.fc",)
    assert freezing.stage_table("timm/convnext_atto")[1] == {
        "freeze": "last1", "stages": "stride32 + pool + head",
        "modules": "stages.3, head.global_pool, head.norm, head.flatten, head.drop, head.fc"}


def test_timm_freeze_specs_train_exactly_the_suffix_of_their_frozen_prefix(timm_model):
    name, model = timm_model
    everything = {id(p) for p in model.parameters()}
    before: set[int] = set()
    for spec in freezing.GRADUAL:
        freezing.freeze(model, spec)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert before < trainable, spec  # each spec trains more than the one before
        before = trainable
        prefix = freezing.frozen_prefix(name, spec)
        if prefix is not None:
            assert not any(p.requires_grad for p in models.trunk(model, prefix).parameters())
            assert {id(p) for p in models.suffix(model, prefix).parameters()} == trainable
    assert before == everything
    freezing.freeze(model, "head")
    head = models.backbone(name).head
    assert freezing.trainable_names(model) == {
        n for n, _ in model.named_parameters() if n.startswith(head + ".")}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_weights_file_loads_safely_and_a_wrong_one_is_one_line(tmp_path, suffix):
    from safetensors.torch import save_file

    def write(state: dict, path):
        save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
        return str(path)

    torch.manual_seed(3)
    source = models.build("timm/convnext_atto", "none", 7)
    right = write({k: v.contiguous() for k, v in source.state_dict().items()},
                  tmp_path / f"convnext{suffix}")
    loaded = models.build("timm/convnext_atto", right, 5)  # another head: left new
    for key, value in source.state_dict().items():
        if not key.startswith("head.fc."):
            assert torch.equal(loaded.state_dict()[key], value), key
    assert models.weights_source("timm/convnext_atto", right)["sha256"] == hashlib.sha256(
        (tmp_path / f"convnext{suffix}").read_bytes()).hexdigest()
    wrong = write(models.build("timm/regnetx_002", "none", 5).state_dict(),
                  tmp_path / f"regnet{suffix}")
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not weights")
    for path, message in ((wrong, "does not fit timm/convnext_atto"), (garbage, "is not a")):
        with pytest.raises(BoatrayError, match=message) as info:
            models.build("timm/convnext_atto", str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_timm_pretrained_without_network_names_the_file_to_place(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    import huggingface_hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    place = tmp_path / "checkpoints" / "timm" / "convnext_atto.d2_in1k.safetensors"
    with pytest.raises(BoatrayError) as error:
        models.fetch_weights("timm/convnext_atto", "pretrained")
    message = str(error.value)
    assert (f"put model.safetensors from https://huggingface.co/timm/convnext_atto.d2_in1k at "
            f"{place}") in message and "--set model.weights=none" in message
    assert "\n" not in message
    from safetensors.torch import save_file

    imagenet = timm.create_model("convnext_atto", num_classes=1000).state_dict()
    place.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in imagenet.items()}, place)
    models.fetch_weights("timm/convnext_atto", "pretrained")  # placed: nothing to fetch
    model = models.build("timm/convnext_atto", "pretrained", 5)
    assert torch.equal(model.stages[3].blocks[0].conv_dw.weight,
                       imagenet["stages.3.blocks.0.conv_dw.weight"])
    assert model.get_classifier().out_features == 5
    source = models.weights_source("timm/convnext_atto", "pretrained")
    assert source["sha256"] == hashlib.sha256(place.read_bytes()).hexdigest()
    with pytest.raises(BoatrayError, match="unknown weights 'IMAGENET1K_V1' for timm/"):
        models.build("timm/convnext_atto", "IMAGENET1K_V1")


@pytest.mark.parametrize("name, message", [
    ("timm/vit_tiny_patch16_224", "reduce the image by 16, 16, .* not 4, 8, 16 and 32"),
    ("timm/ghostnet_100", "classifier does not take what the module before it returned"),
    ("timm/swin_tiny_patch4_window7_224", "cannot take 240x800 images .*e.g. .224, 224.$"),
    ("timm/no_such_net", "unknown timm model 'no_such_net' .not in timm.list_models"),
    ("timm/convnext_atto.no_such_tag", "unknown pretrained tag 'no_such_tag' .*d2_in1k"),
    ("vgg16", "unknown model 'vgg16'; choose one of bettercnn, .* or timm/"),
])
def test_networks_boatray_cannot_cut_are_refused_at_the_door_in_one_line(name, message):
    """A ViT keeps one stride; GhostNet drops out functionally before its classifier (its
    stages would not compose to the model in training); a Swin takes one image size."""
    with pytest.raises(BoatrayError, match=message) as info:
        from_dict({"model": {"name": name, "weights": "none"}})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- features and the cache

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """4 classes of 8 generated training images at 64x96: 24 train, 8 valid, 8 test."""
    root = tmp_path_factory.mktemp("backbone-data")
    tree = synthetic.generate(root / "images", SyntheticConfig(
        classes=4, train_per_class=8, test_per_class=2, image_size=SIZE, imbalance=1.0), 0)
    return manifest_module.prepare(tree, root / "data", valid_fraction=0.25, seed=0)


def test_features_of_a_timm_backbone_are_its_trunk_on_the_images(manifest, tmp_path):
    """The features pipeline (in process for so few images) at a stride cut point (fp32:
    compared with an fp32 loop, not bf16 on a CPU that has it)."""
    out = pipeline.extract(manifest, tmp_path / "features.parquet",
                           ModelConfig(name="timm/regnetx_002", weights="none"),
                           FeaturesConfig(num_actors=1, stage="stride16", batch_size=8,
                                          amp=False), SIZE)
    x, table = featurefile.read_features(out)
    torch.manual_seed(0)  # extract's seed: the same random trunk
    trunk = models.trunk(models.build("timm/regnetx_002", "none", 4), "stride16").eval()
    with torch.no_grad():
        expected = trunk(normalize(to_chw(decode_batch(table.path.tolist(), SIZE))))
    assert len(table) == 40 and expected.shape[-2:] == (SIZE[0] // 16, SIZE[1] // 16)
    torch.testing.assert_close(torch.from_numpy(x.copy()), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_timm_backbone_trains_from_its_prefix_cache_exactly(manifest, tmp_path, monkeypatch,
                                                              capsys):
    """freeze last1 on MobileNetV3: the stride-16 activations cached in float32 train the same
    weights as the images do (in fp32: amp false), and the checkpoint rebuilds the network."""
    monkeypatch.setattr(prefix_cache, "DTYPE", "float32")
    save, states = checkpoints.save_checkpoint, {}

    def keep(directory, module, *rest):
        states[len(states)] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return save(directory, module, *rest)

    monkeypatch.setattr(loop, "save_checkpoint", keep)
    settings = {"storage_path": str(tmp_path / "results"), "data": {"image_size": list(SIZE)},
                "model": {"name": "timm/mobilenetv3_small_050", "weights": "none"},
                "features": {"amp": False},
                "train": {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.05,
                          "amp": False, "freeze": "last1", "num_workers": 0, "loader_workers": 0,
                          "cache_min_speedup": 1.0}}
    results = {}
    for cache in (True, False):
        exp = from_dict(settings)
        exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, cache_prefix=cache))
        result = trainer.fit(exp, manifest, tmp_path / "runs" / str(cache))
        results[cache] = (states[len(states) - 1], result)
    assert "training from cached stride16 activations" in capsys.readouterr().out
    (cached, run), (images, _) = results[True], results[False]
    for key in cached:
        torch.testing.assert_close(cached[key], images[key], rtol=1e-4, atol=1e-5)
    model, meta = checkpoints.load_model(run.checkpoint.path)
    assert "stride16" in meta["prefix_cache"]
    assert models.backbone_of(model).name == "timm/mobilenetv3_small_050"
    torch.testing.assert_close(model.state_dict(), cached)
