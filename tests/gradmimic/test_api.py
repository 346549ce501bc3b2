"""The user-facing API: references, parameters, sites, open_clip, and the import boundary."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradmimic import ClipSites, GradMimic, Weighting, capture_linear_sites, load_state_dict

PKG = pathlib.Path(__file__).resolve().parents[2] / "gradmimic"


def head_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def test_import_does_not_pull_ray_or_torch_distributed():
    code = (
        "import sys, torch; before = set(sys.modules); import gradmimic; "
        "new = [m for m in set(sys.modules) - before if m.split('.')[0] == 'ray' or m.startswith('torch.distributed')]; "
        "print(new); sys.exit(1 if new or 'ray' in sys.modules else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_sources_never_import_ray_or_torch_distributed():
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not (n == "ray" or n.startswith("ray.") or n.startswith("torch.distributed")), f"{path}: {n}"


def test_reference_shape_mismatch_names_parameter_and_shapes():
    model = head_model()
    ref = {"2.weight": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(5, 3\) but the model's has \(2, 3\)"):
        GradMimic(model, ["2.weight"], reference=ref)


def test_reference_dtype_and_missing_parameter():
    model = head_model()
    with pytest.raises(ValueError, match="dtype torch.float64"):
        GradMimic(model, ["2.weight"], reference={"2.weight": torch.zeros(2, 3, dtype=torch.float64)})
    with pytest.raises(KeyError, match="reference has no parameter '2.weight'"):
        GradMimic(model, ["2.weight"], reference={"0.weight": torch.zeros(3, 4)})


def test_unknown_and_non_matrix_parameters():
    model = head_model()
    with pytest.raises(KeyError, match=r"model has no parameter 'head.weight' \(similar: 2.weight, 0.weight"):
        GradMimic(model, ["head.weight"], reference=model)
    with pytest.raises(ValueError, match="must be a 2-D weight"):
        GradMimic(model, ["2.bias"], reference=model)
    with pytest.raises(ValueError, match="needs reference weights"):
        GradMimic(model, ["2.weight"])
    with pytest.raises(TypeError, match="not the weight of an nn.Linear"):
        with capture_linear_sites(model, ["2.bias"]):
            pass


def test_missing_site_and_wrong_loss_shape():
    model = head_model()
    mimic = GradMimic(model, ["2.weight"], reference=model)
    x = torch.randn(5, 4)
    with pytest.raises(KeyError, match=r"no site recorded for mimic parameter\(s\) \['2.weight'\]"):
        mimic.step(model(x).sum(1), {})
    with capture_linear_sites(model, ["2.weight"]) as sites:
        out = model(x)
    with pytest.raises(ValueError, match="per-sample loss vector"):
        mimic.step(out.sum(), sites)


def test_reference_files_load_without_unpickling(tmp_path):
    from safetensors.torch import save_file

    model = head_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "ref.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ref.pt")
    for name in ("ref.safetensors", "ref.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"w": nn.Linear(2, 2)}, tmp_path / "code.pt")  # a pickled module, not just tensors
    with pytest.raises(ValueError, match=r"code\.pt: refused: not a safetensors file nor a weights-only torch checkpoint \(it holds objects other than tensors"):
        load_state_dict(tmp_path / "code.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")


def test_open_clip_sites_match_the_model_and_the_full_model_oracle():
    pytest.importorskip("open_clip")
    from pipelines.bench.exact_steps import make_batch
    from pipelines.models.build import tiny_clip
    from tests.support.oracle import assert_clip_mimic_matches_oracle

    model = tiny_clip(seed=1).double()
    images, texts = make_batch(model, 5, seed=2)
    images = images.double()
    wrapper = ClipSites(model)
    batch = wrapper(images, texts)
    assert torch.allclose(batch.image_site.outputs, model.encode_image(images))
    assert torch.allclose(batch.text_site.outputs, model.encode_text(texts))
    assert isinstance(model.visual.proj, nn.Parameter)  # restored after the bypass
    assert_clip_mimic_matches_oracle(model, images, texts)


def test_alignment_tells_a_reference_from_another_initialisation():
    """A reference trained from the model's own init lies along its descent path; one from another init does not."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 4)).argmax(1)

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))

    def trained(seed):
        m = net(seed)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(300):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return m.state_dict()

    alignment = {}
    for name, ref in (("same", trained(1)), ("other", trained(2))):
        model = net(1)
        mimic = GradMimic(model, ["2.weight"], reference=ref)
        with capture_linear_sites(model, ["2.weight"]) as sites:
            loss = F.cross_entropy(model(x), y, reduction="none")
        alignment[name] = mimic.step(loss, sites, backward=False).alignment
        assert model[2].weight.grad is None  # backward=False scores without touching gradients
    assert alignment["same"] > 0.6 and abs(alignment["other"]) < 0.3, alignment


def _ce_step(model, mimic, x, y, **kw):
    import torch.nn.functional as F

    with capture_linear_sites(model, ["2.weight"]) as sites:
        loss = F.cross_entropy(model(x).float(), y, reduction="none").to(model[2].weight.dtype)
    return mimic.step(loss, sites, **kw)


def test_half_precision_scores_stay_finite_at_a_zero_task_vector():
    model = head_model().half()
    mimic = GradMimic(model, ["2.weight"], reference=model, weighting=Weighting("mimic", "normed_cos", 0.5))
    out = _ce_step(model, mimic, torch.randn(6, 4).half(), torch.randint(0, 2, (6,)))
    assert torch.equal(out.scores, torch.zeros(6)) and out.scores.dtype == torch.float32
    assert torch.allclose(out.weights, torch.full((6,), 1 / 6))
    assert torch.isfinite(model[2].weight.grad.float()).all()


def test_direction_follows_the_parameters_dtype_and_frozen_head_is_an_error():
    model = head_model()
    mimic = GradMimic(model, ["2.weight"], weighting=Weighting("influence", "normed_proj", 1.0))
    mimic.set_direction({"2.weight": torch.ones(2, 3, dtype=torch.float64)})
    out = _ce_step(model, mimic, torch.randn(5, 4), torch.randint(0, 2, (5,)))
    assert out.dots.dtype == torch.float32 and mimic.direction()["2.weight"].dtype == torch.float32
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad, so reweight='param' would change nothing"):
        _ce_step(model, mimic, torch.randn(5, 4), torch.randint(0, 2, (5,)))
    assert _ce_step(model, mimic, torch.randn(5, 4), torch.randint(0, 2, (5,)), backward=False).weights.shape == (5,)


def test_a_wrong_rank_is_caught():
    from gradmimic import global_softmax

    parts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]

    def gather(t):
        if t.dtype == torch.float64 and t.numel() == 1:
            return torch.tensor([2.0, 1.0], dtype=torch.float64)
        return torch.cat(parts)

    assert torch.allclose(global_softmax(parts[1], 1.0, gather, rank=1), torch.softmax(torch.cat(parts), 0)[2:])
    with pytest.raises(ValueError, match="rank=0 does not match this process's place in the gather order"):
        global_softmax(parts[1], 1.0, gather, rank=0)
