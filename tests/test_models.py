"""Model registry and the retinopathy grader's flavours (full sizes too, so they never rot)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models


@pytest.mark.timeout(30)
def test_registry_lists_valid_names_on_a_typo():
    assert "retinopathy" in models.names()
    assert {"tiny", "full", "resnet50"} <= set(models.flavours("retinopathy"))
    with pytest.raises(models.ModelError, match="valid: autonomous, mf, recsys, retinopathy"):
        models.build("retinopthy")
    with pytest.raises(models.ModelError, match="valid: full, resnet50, tiny"):
        models.build("retinopathy", "huge")


@pytest.mark.timeout(60)
def test_freezing_levels():
    def trainable(level):
        m = models.build("retinopathy", "tiny", freeze=level)
        return {
            n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone.")
        }

    assert trainable("none") == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert trainable("early") == {"layer3", "layer4"}
    assert trainable("all") == set()
    head = [p.requires_grad for p in models.build("retinopathy", "tiny", freeze="all").head.parameters()]
    assert all(head)


@pytest.mark.timeout(60)
def test_pretrained_backbone_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    donor = models.build("retinopathy", "tiny")
    state = {
        k.removeprefix("backbone."): v for k, v in donor.state_dict().items() if k.startswith("backbone.")
    }
    save_file(state, str(tmp_path / "backbone.safetensors"))
    model = models.build("retinopathy", "tiny", pretrained=str(tmp_path / "backbone.safetensors"))
    assert torch.equal(model.backbone.conv1.weight, donor.backbone.conv1.weight)
    with pytest.raises(models.ModelError, match="not found"):
        models.build("retinopathy", "tiny", pretrained=str(tmp_path / "missing.pt"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("flavour", "size"), [("full", 299), ("resnet50", 512)])
def test_full_flavours_take_one_training_step_at_batch_2(flavour, size):
    torch.manual_seed(0)
    model = models.build("retinopathy", flavour)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 4])
    model.train()
    out = model(x)
    if flavour == "full":  # InceptionV3: the auxiliary classifier has our 5 grades too
        logits, aux = out
        assert aux.shape == (2, 5)
        loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
    else:
        logits = out
        loss = F.cross_entropy(logits, y)
    assert logits.shape == (2, 5)
    before = model.head[-1].weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.head[-1].weight)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)  # eval mode: logits only
    assert sum(p.numel() for p in model.parameters()) > 20_000_000


@pytest.mark.timeout(300)
def test_every_profile_builds_its_exact_model_on_the_meta_device(tmp_path):
    """Every recipe profile's model at its full shape (the 4M-row recsys table, eight ResNet-50s,
    d_model 2048), built without memory: the shapes never rot, and the sizes are the ones the
    README and `deepfleet plan` quote. Recsys reads its feature sizes from prepared data."""
    import yaml

    from jobs import tasks
    from jobs.config import load_recipe
    from tests.conftest import CONFIGS

    recsys_data = tmp_path / "recsys"
    small = load_recipe(CONFIGS / "recsys.yaml", "tiny", [f"data.root={recsys_data}", "data.num_tracks=300",
                        "data.num_users=40", "data.num_sessions=200"])  # fmt: skip
    tasks.get("recsys").prepare(small)
    sizes = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        for profile in yaml.safe_load(path.read_text())["profiles"]:
            sets = [f"data.root={recsys_data}"] if path.stem == "recsys" else []
            if path.stem == "recsys" and profile == "mssd":
                sets.append("data.import_path=unused")  # the importer is not run here
            recipe = load_recipe(path, profile, sets)
            with torch.device("meta"):
                model = tasks.build_model(recipe)
            sizes[f"{path.stem}-{profile}"] = sum(p.numel() for p in model.parameters())
    assert 25e6 < sizes["retinopathy-full"] < 26e6 and 24e6 < sizes["retinopathy-resnet50"] < 25e6
    assert 450e6 < sizes["autonomous-full"] < 452e6 and 615e6 < sizes["autonomous-zero3"] < 616e6
    # the recsys full table: 4,000,001 x 128 (512M) of its 514M parameters, whatever the catalogue
    assert sizes["recsys-full"] == sizes["recsys-zero3"] and 514e6 < sizes["recsys-full"] < 515e6
