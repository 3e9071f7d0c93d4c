"""models.py: registry, weights files, freeze specs, BatchNorm eval, param groups, cut points."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from boatray import freezing, models
from boatray.errors import BoatrayError

SMALL = (32, 96)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return models.build("resnet18", "none", num_classes=5)


RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def stage_of(name: str) -> str:
    head = name.split(".")[0]
    return {"conv1": "stem", "bn1": "stem", "fc": "head"}.get(head, head)


@pytest.mark.parametrize("spec, trainable", [
    ("head", {"head"}),
    ("last1", {"layer4", "head"}),
    ("last2", {"layer3", "layer4", "head"}),
    ("last3", {"layer2", "layer3", "layer4", "head"}),
    ("last4", {"layer1", "layer2", "layer3", "layer4", "head"}),
    ("all", set(RESNET_STAGES)),
])
def test_freeze_spec_leaves_exactly_its_stages_trainable(resnet18, spec, trainable):
    freezing.freeze(resnet18, spec)
    names = {n for n, _ in resnet18.named_parameters()}
    expected = {n for n in names if stage_of(n) in trainable}
    assert freezing.trainable_names(resnet18) == expected
    groups = freezing.param_groups(resnet18, lr=1e-2, lr_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(expected)
    assert [g["stage"] for g in groups] == [s for s in RESNET_STAGES if s in trainable]


def test_param_groups_decay_the_lr_of_earlier_stages(resnet18):
    freezing.freeze(resnet18, "last2")
    lrs = {g["stage"]: g["lr"] for g in freezing.param_groups(resnet18, lr=1e-2, lr_decay=0.5)}
    assert lrs == pytest.approx({"head": 1e-2, "layer4": 5e-3, "layer3": 2.5e-3})


def test_freeze_rejects_unknown_specs_and_bettercnn_partial_freezing(resnet18):
    with pytest.raises(BoatrayError, match="unknown freeze spec 'gradual'"):
        freezing.freeze(resnet18, "gradual")
    with pytest.raises(BoatrayError, match="bettercnn .* 'all'"):
        freezing.freeze(models.build("bettercnn"), "head")


def test_gradual_schedule_unfreezes_one_stage_every_n_epochs():
    assert [freezing.gradual_schedule(e, 2) for e in range(13)] == [
        "head", "head", "last1", "last1", "last2", "last2", "last3", "last3",
        "last4", "last4", "all", "all", "all"]


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics(resnet18):
    freezing.freeze(resnet18, "last1")
    freezing.train_mode(resnet18)
    assert not resnet18.bn1.training and not resnet18.layer3[0].bn1.training
    assert resnet18.layer4[0].bn1.training and resnet18.training
    before = resnet18.layer3[0].bn1.running_mean.clone()
    resnet18(torch.randn(2, 3, *SMALL))
    assert torch.equal(resnet18.layer3[0].bn1.running_mean, before)


def test_state_dict_round_trips_through_a_file(tmp_path, resnet18):
    path = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in resnet18.state_dict().items()}, path)  # DDP-saved
    loaded = models.build("resnet18", str(path), num_classes=5)
    for key, value in resnet18.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_file_without_head_or_with_another_head_loads_the_trunk(tmp_path, resnet18):
    trunk_only = {k: v for k, v in resnet18.state_dict().items() if not k.startswith("fc.")}
    torch.save(trunk_only, tmp_path / "trunk.pt")
    torch.save(resnet18.state_dict(), tmp_path / "five.pt")
    for file in ("trunk.pt", "five.pt"):
        loaded = models.build("resnet18", str(tmp_path / file), num_classes=16)
        assert loaded.fc.out_features == 16
        assert torch.equal(loaded.layer4[1].conv2.weight, resnet18.layer4[1].conv2.weight)


@pytest.mark.parametrize("content, message", [
    ("resnet34", "does not fit resnet18: .* keys are not in it"),
    ("missing", "does not fit resnet18: 1 of its keys are missing .*layer1.0.conv1.weight"),
    ("bettercnn", "does not fit resnet18"),
    ("tensor", "is not a PyTorch state dict"),
    ("text", "is not a PyTorch state dict"),
])
def test_a_wrong_weights_file_is_a_one_line_error_naming_it(tmp_path, resnet18, content, message):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("not a checkpoint\n")
    else:
        state = {"resnet34": lambda: models.build("resnet34").state_dict(),
                 "bettercnn": lambda: models.build("bettercnn").state_dict(),
                 "tensor": lambda: torch.zeros(3),
                 "missing": lambda: {k: v for k, v in resnet18.state_dict().items()
                                     if k != "layer1.0.conv1.weight"}}[content]()
        torch.save(state, path)
    with pytest.raises(BoatrayError, match=message) as info:
        models.build("resnet18", str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(BoatrayError, match="valid: none, IMAGENET1K_V1, .*weights file"):
        models.build("resnet50", "IMAGENET_V9")
    with pytest.raises(BoatrayError, match="unknown model 'vgg16'; choose one of bettercnn"):
        models.build("vgg16")
    with pytest.raises(BoatrayError, match="bettercnn has no named weights .got "
                                           ".IMAGENET1K_V1..; valid: none, or a"):
        models.build("bettercnn", "IMAGENET1K_V1")


def test_bettercnn_is_the_lab_architecture_at_30x100_and_takes_other_sizes():
    net = models.build("bettercnn", num_classes=16)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {"conv1.weight": (30, 3, 5, 5), "conv1.bias": (30,),
                      "conv2.weight": (15, 30, 3, 3), "conv2.bias": (15,),
                      "fc1.weight": (128, 1725), "fc1.bias": (128,),
                      "fc2.weight": (50, 128), "fc2.bias": (50,),
                      "fc3.weight": (16, 50), "fc3.bias": (16,)}
    x = torch.randn(2, 3, 30, 100)
    conv = net.down(net.act(net.conv2(net.down(net.act(net.conv1(x))))))
    assert conv.shape == (2, 15, 5, 23) and torch.equal(net.pool(conv), conv)  # identity at 30x100
    for size in ((30, 100), (48, 160), (240, 800), (12, 12)):
        assert net(torch.randn(2, 3, *size)).shape == (2, 16)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_adaptive_pooling_takes_non_square_images(pooling):
    net = models.build("resnet18", num_classes=3, pooling=pooling).eval()
    expected = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}[pooling]
    assert isinstance(net.avgpool, expected)
    assert net(torch.randn(1, 3, 240, 800)).shape == (1, 3)


def test_trunk_and_suffix_compose_to_the_model(resnet18):
    resnet18.eval()
    x = torch.randn(2, 3, *SMALL)
    with torch.no_grad():
        expected = resnet18(x)
        for cut in models.cut_points("resnet18"):
            assert torch.allclose(models.suffix(resnet18, cut)(models.trunk(resnet18, cut)(x)),
                                  expected, atol=1e-5), cut
        assert models.trunk(resnet18, "pool")(x).shape == (2, 512)
        assert models.trunk(resnet18, "layer3")(x).shape == (2, 256, 2, 6)
        cnn = models.build("bettercnn", num_classes=4).eval()
        assert torch.allclose(models.suffix(cnn)(models.trunk(cnn)(x)), cnn(x))
    assert models.trunk(resnet18).state_dict().keys() != resnet18.state_dict().keys()
    assert models.trunk(resnet18)[0] is resnet18.conv1  # shares the model's modules
    with pytest.raises(BoatrayError, match="unknown cut point 'layer9'"):
        models.trunk(resnet18, "layer9")


def test_frozen_prefix_is_the_last_fully_frozen_cut_point():
    assert [freezing.frozen_prefix("resnet50", s) for s in freezing.FREEZE_SPECS] == [
        "pool", "layer3", "layer2", "layer1", "stem", None, None]


def test_every_backbone_names_its_cut_points_and_stages_in_its_registry_entry():
    """The registry's static cut points are the model's own table, and a freeze spec trains
    the same number of stages on every backbone (the report's stage table)."""
    for name in models.names():
        if name == "efficientnet_lite0" and importlib.util.find_spec("timm") is None:
            continue
        model = models.build(name, "none", 3)
        assert tuple(models.stage_modules(model))[:-1] == models.cut_points(name), name
    rows = {r["freeze"]: r for r in freezing.stage_table("resnet50")}
    assert rows["last2"] == {"freeze": "last2", "stages": "layer3 + layer4 + head",
                             "modules": "layer3, layer4, fc"}
    assert [r["freeze"] for r in freezing.stage_table("bettercnn")] == ["all"]
