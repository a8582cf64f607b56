"""The network, checkpoint loading, batching and Grad-CAM, on small random inputs."""
import numpy as np
import pytest
import torch

from osteoscreen.model.inference import LoadedModel
from osteoscreen.model.network import NonLocalBlock, OsteoNet


def save_checkpoint(path, net=None, **extra):
    net = net or OsteoNet()
    torch.save({"state_dict": net.state_dict(), "arch": net.arch, "name": "test-net", "version": "9.9",
                "temperature": 1.5, "t_score_mean": -1.0, "t_score_std": 2.0, **extra}, path)
    return path


def test_non_local_block_starts_as_identity():
    block = NonLocalBlock(8).eval()
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(block(x), x)


def test_forward_shapes():
    net = OsteoNet().eval()
    logits, t = net(torch.randn(3, 1, 128, 128), torch.zeros(3, 7), torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 3) and t.shape == (3, 1)


def test_loaded_model_predicts_calibrated_probabilities_and_cams(tmp_path):
    model = LoadedModel(save_checkpoint(tmp_path / "m.pt"), device="cpu")
    assert model.info.name == "test-net" and model.info.version == "9.9" and len(model.info.checksum) == 64
    rng = np.random.default_rng(0)
    crops = rng.uniform(-1, 1, (5, 128, 128)).astype(np.float32)
    pred = model.predict(crops, np.zeros((5, 7), np.float32), np.array([0, 0, 1, 2, 0]), batch_size=2)
    assert pred.probabilities.shape == (5, 3) and np.allclose(pred.probabilities.sum(1), 1, atol=1e-5)
    assert pred.cams.shape == (5, 128, 128) and pred.cams.min() >= 0 and pred.cams.max() <= 1 + 1e-6
    assert pred.t_scores.shape == (5,)
    # batching does not change results (eval mode, no randomness)
    single = model.predict(crops[:1], np.zeros((1, 7), np.float32), np.array([0]))
    assert np.allclose(single.probabilities[0], pred.probabilities[0], atol=1e-5)


def test_gradcam_follows_the_evidence(tmp_path):
    """A network whose class score depends only on the left half of the image must light up there."""
    net = OsteoNet().eval()
    with torch.no_grad():  # make the class score read a channel that is strong where the input is bright
        for p in net.classifier.parameters():
            p.zero_()
    model = LoadedModel(save_checkpoint(tmp_path / "m.pt", net), device="cpu")
    torch.manual_seed(0)
    # train the head quickly to detect brightness on the left half
    x = torch.zeros(64, 1, 128, 128)
    y = torch.randint(0, 2, (64,))
    x[y == 1, :, :, :64] = 1.0
    x += 0.1 * torch.randn_like(x)
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        logits, _ = net(x, torch.zeros(64, 7), torch.zeros(64, dtype=torch.long))
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(), loss.backward(), opt.step()
    model = LoadedModel(save_checkpoint(tmp_path / "m2.pt", net), device="cpu")
    probe = np.zeros((1, 128, 128), np.float32)
    probe[0, :, :64] = 1.0
    cam = model.predict(probe, np.zeros((1, 7), np.float32), np.array([0])).cams[0]
    assert cam[:, :64].sum() > 2 * cam[:, 64:].sum()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        LoadedModel(tmp_path / "none.pt")


def test_mixed_precision_predicts_what_fp32_does_in_float32():
    """model_precision: mixed runs the network under torch.autocast (bfloat16 on a CPU; on a GPU
    bfloat16 or float16): the shipped model on real phantom crops gives float32 outputs, the same
    classes, and estimates within a few thousandths of fp32's, Grad-CAM and the OOD check included."""
    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.pipeline import screen
    from osteoscreen.pipeline.crops import normalise
    from osteoscreen.pipeline.screen import StudyImage
    from osteoscreen.synth import make_study

    crops, covs, types = [], [], []
    full = LoadedModel(DEFAULT_MODEL, device="cpu", threads=1)
    for kind, seed in (("hip", 1), ("hip", 2), ("lumbar", 3)):
        images = make_study(kind, np.random.default_rng(seed), patient_index=seed)
        _, pending = screen._prepare([StudyImage(im.dataset, kind, im.view) for im in images], full, heatmaps=False)
        for p in pending:
            crops.append(normalise(p.crop.pixels))
            covs.append(p.covariates)
            types.append(p.site_type)
    crops, covs, types = np.stack(crops).astype(np.float32), np.array(covs, np.float32), np.array(types)
    mixed = LoadedModel(DEFAULT_MODEL, device="cpu", threads=1, precision="mixed")
    assert full.autocast_dtype is None and mixed.autocast_dtype == torch.bfloat16
    a, b = full.predict(crops, covs, types), mixed.predict(crops, covs, types)
    for name in ("probabilities", "t_scores", "cams", "embeddings", "ood_distance"):
        assert getattr(b, name).dtype in (np.float32, np.float64), name
    assert (a.probabilities.argmax(1) == b.probabilities.argmax(1)).all()
    assert np.abs(a.probabilities - b.probabilities).max() < 0.02
    assert np.abs(a.t_scores - b.t_scores).max() < 0.1
    assert np.abs(a.cams - b.cams).max() < 0.25 and (a.out_of_distribution() == b.out_of_distribution()).all()
    with pytest.raises(ValueError, match="precision"):
        LoadedModel(DEFAULT_MODEL, device="cpu", precision="fp8")
