"""Models at any input size, local weights, and bringing your own image folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fl_sim.data import DataSpec, load_dataset
from fl_sim.models import MODELS, build_model, last_linear


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "lenet"])
@pytest.mark.parametrize("size", [32, 56, 112])
def test_models_take_any_size_and_the_task_classes(name, size):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7)
    assert last_linear(model).out_features == 7


def test_model_weights_load_from_a_local_file(tmp_path):
    a = build_model("resnet18", 2)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = build_model("resnet18", 2, weights=tmp_path / "w.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(KeyError, match="unknown model .vgg99.; allowed: lenet, mobilenet_v2, resnet18"):
        build_model("vgg99", 2)
    assert {"resnet18", "mobilenet_v2"} <= set(MODELS)


def test_image_folder_one_subfolder_per_identity(tmp_path, orl64):
    for person in range(3):
        (tmp_path / f"person{person}").mkdir()
        for shot in range(2):
            img = (orl64.images[person * 10 + shot].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(img).resize((80, 96)).save(tmp_path / f"person{person}" / f"{shot}.png")
    ds = load_dataset(DataSpec("image-folder", 48, root=str(tmp_path)))
    assert ds.images.shape == (6, 3, 48, 48)
    assert ds.identities.tolist() == [0, 0, 1, 1, 2, 2] and ds.num_classes == 3
    assert ds.grey  # the ORL pictures are grey, and the loader notices


def test_normalisation_is_recorded_and_invertible(orl64):
    x = orl64.images[:2]
    z = orl64.normalise(x)
    mean = torch.tensor(orl64.mean).view(1, 3, 1, 1)
    std = torch.tensor(orl64.std).view(1, 3, 1, 1)
    assert torch.allclose(z * std + mean, x, atol=1e-6)


@pytest.mark.parametrize("name", ["lfw", "celeba"])
def test_missing_downloadable_data_set_says_what_to_do(tmp_path, name):
    from fl_sim.data import DataError

    with pytest.raises(DataError, match="data.root.*data.download=true"):
        load_dataset(DataSpec(name, 64, root=str(tmp_path)))
