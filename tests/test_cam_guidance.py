"""Grad-CAM guidance: phantoms write their bone masks, training crops carry them on the crop grid,
the off-bone penalty is the node's Grad-CAM and training on it moves the map onto bone; the
display heatmap fades out at the crop border."""
import csv

import numpy as np
import torch
from PIL import Image
from pydicom import dcmread

from osteoscreen.cli import main
from osteoscreen.model.network import OsteoNet
from osteoscreen.pipeline.crops import Crop, edge_taper, paste_map
from osteoscreen.synth import make_study, synthesize
from osteoscreen.training.dataset import extract_samples
from osteoscreen.training.train import augment, cam_off_bone


def test_synth_writes_bone_masks_without_changing_the_images(tmp_path):
    with_masks = synthesize("lumbar", 1, tmp_path / "m", seed=31, progress=False, bone_masks=True)
    without = synthesize("lumbar", 1, tmp_path / "p", seed=31, progress=False)
    rows = list(csv.DictReader(open(with_masks)))
    assert [r["bone_mask"] for r in rows] == ["lumbar_00001_ap_bone.png", "lumbar_00001_lat_bone.png"]
    assert all(r["bone_mask"] == "" for r in csv.DictReader(open(without)))
    truth = make_study("lumbar", np.random.default_rng([31, 0]), patient_index=1)
    for row, image in zip(rows, truth):
        ds = dcmread(tmp_path / "m" / row["path"])
        assert np.array_equal(ds.pixel_array, dcmread(tmp_path / "p" / row["path"]).pixel_array)
        mask = np.asarray(Image.open(tmp_path / "m" / row["bone_mask"])) > 0
        assert mask.shape == (ds.Rows, ds.Columns)
        assert np.array_equal(mask, image.bone_mask)
        assert 0.05 < mask.mean() < 0.6


def test_training_crops_carry_their_bone_mask(tmp_path):
    manifest = synthesize("hip", 2, tmp_path / "h", seed=32, progress=False, bone_masks=True)
    samples, _ = extract_samples([manifest], progress=False, workers=1)
    assert samples.has_mask.all() and samples.masks.shape == samples.crops.shape
    for crop, mask in zip(samples.crops, samples.masks / 255.0):
        # the mask lies on the bone of the crop (bone is bright), left hips mirrored like their crops
        on, off = (crop * mask).sum() / mask.sum(), (crop * (1 - mask)).sum() / (1 - mask).sum()
        assert on > off + 0.1
        assert 0.2 < mask.mean() < 0.9


def test_a_manifest_without_masks_trains_unguided(tmp_path):
    manifest = synthesize("hip", 1, tmp_path / "h", seed=33, progress=False)
    samples, _ = extract_samples([manifest], progress=False, workers=1)
    assert not samples.has_mask.any() and samples.subset(np.array([0])).masks.shape[0] == 1


def test_augment_moves_masks_with_the_crops():
    gen = torch.Generator().manual_seed(0)
    raw = torch.zeros(4, 1, 64, 64)
    raw[:, :, 20:40, 10:30] = 1.0  # a bright square, and the same square as its mask
    x, m = augment(raw, gen, raw.clone())
    assert m.shape == raw.shape
    for xi, mi in zip(x[:, 0], m[:, 0]):
        assert xi[mi > 0.5].mean() > xi[mi < 0.5].mean() + 1.0  # noise is 0.03, the square ~2 after the 2σ transform


def _toy_batch(n=16, size=64, seed=0):
    """Crops whose class shows both on a bright 'bone' half and on the 'soft tissue' half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = 0.1 * torch.randn(n, 1, size, size, generator=g)
    level = labels.float()[:, None, None] - 1
    x[:, 0, :, : size // 2] += 1.0 + 0.5 * level  # bone on the left half
    x[:, 0, :, size // 2:] += 0.5 * level  # the same evidence off bone
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, :, : size // 2] = 1.0
    return x, labels, masks


def _off_bone(net, x, labels, masks):
    early = net.early_features(x)
    fmap = net.stage3(early)
    logits, _, _ = net.heads(fmap, torch.zeros(len(x), 7), torch.zeros(len(x), dtype=torch.long))
    return cam_off_bone(net, early, fmap, logits, labels, masks), logits


def test_cam_off_bone_is_a_share_and_training_on_it_moves_the_map_onto_bone():
    torch.manual_seed(0)
    net = OsteoNet(widths=(8, 8, 16, 16)).train()
    x, labels, masks = _toy_batch()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(10):  # a class signal first, so that the CAM means something
        _, logits = _off_bone(net, x, labels, masks)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
    net.eval()
    before, _ = _off_bone(net, x, labels, masks)
    assert ((before >= 0) & (before <= 1)).all()
    net.train()
    for _ in range(25):
        off, logits = _off_bone(net, x, labels, masks)
        loss = torch.nn.functional.cross_entropy(logits, labels) + off.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    after, _ = _off_bone(net, x, labels, masks)
    assert after.mean() < before.mean() - 0.1 and after.mean() < 0.3


def test_train_with_cam_guidance_records_it(tmp_path):
    manifest = synthesize("hip", 3, tmp_path / "h", seed=34, progress=False, bone_masks=True)
    out = tmp_path / "model"
    assert main(["train", "--manifest", str(manifest), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--val-fraction", "0.34", "--cam-guidance", "0.5", "--quiet"]) == 0
    ckpt = torch.load(out / "model.pt", weights_only=False)
    assert ckpt["train_config"]["cam_guidance"] == 0.5 and ckpt["trained_on"]["n_masked"] == 4
    assert ckpt["train_config"]["cam_guidance_warmup"] == 0.25
    assert "Grad-CAM guidance (weight 0.5, reached linearly over the first 25% of the epochs)" in (
        out / "model_card.md").read_text()
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "bad"), "--cam-guidance", "-1"]) == 2
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "bad"), "--cam-guidance", "1",
                 "--cam-guidance-warmup", "2"]) == 2


def test_edge_taper_and_feathered_paste():
    w = edge_taper(100, 0.1)
    assert w[50, 50] == 1.0 and w[0, 50] < 0.05 and w[0, 0] < 0.01 and np.allclose(w, w.T)
    assert np.array_equal(edge_taper(10, 0.0), np.ones((10, 10)))
    crop = Crop(pixels=np.zeros((32, 32), np.float32), origin=(10.0, 20.0), side=64.0, mirrored=False)
    cam = np.ones((32, 32), np.float32)
    raw, soft = paste_map(cam, crop, (100, 120)), paste_map(cam, crop, (100, 120), feather=0.15)
    assert raw[10, 20] == 1.0 and soft[10, 20] < 0.1  # the crop's corner: hard edge vs faded
    assert soft[42, 52] == raw[42, 52] == 1.0  # the centre keeps its value
    assert soft[:10].sum() == 0 and soft[:, :20].sum() == 0  # nothing outside the crop
