"""`osteoscreen train` end to end on a few phantoms: outputs, resume, seed reproducibility."""
import json

import torch

from osteoscreen.cli import main
from osteoscreen.synth import synthesize


def _manifest(tmp_path, name, seed, count=6):
    return synthesize("hip", count, tmp_path / name, seed=seed, progress=False)


def test_train_writes_checkpoint_card_and_resumes(tmp_path):
    train_m, hold_m = _manifest(tmp_path, "train", 501), _manifest(tmp_path, "hold", 502, count=3)
    out = tmp_path / "model"
    args = ["train", "--manifest", str(train_m), "--holdout", str(hold_m), "--out", str(out),
            "--batch-size", "4", "--val-fraction", "0.34", "--quiet"]
    assert main([*args, "--epochs", "2"]) == 0
    ckpt = torch.load(out / "model.pt", weights_only=False)
    assert ckpt["arch"] and ckpt["temperature"] > 0 and len(ckpt["history"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"validation", "holdout"} and metrics["holdout"]["n"] == 6  # 3 pelvis films, 2 hips each
    card = (out / "model_card.md").read_text()
    assert "synthetic phantoms" in card and "Not for diagnosis" in card
    assert (out / "plots" / "holdout" / "roc.png").is_file()
    # resume: two more epochs continue the history rather than start again
    assert main([*args, "--epochs", "4", "--resume"]) == 0
    assert [h["epoch"] for h in torch.load(out / "model.pt", weights_only=False)["history"]] == [1, 2, 3, 4]


def test_same_seed_same_weights(tmp_path):
    m = _manifest(tmp_path, "train", 503, count=4)
    weights = []
    for run in ("a", "b"):
        assert main(["train", "--manifest", str(m), "--out", str(tmp_path / run), "--epochs", "1",
                     "--batch-size", "4", "--val-fraction", "0.25", "--seed", "7", "--quiet"]) == 0
        weights.append(torch.load(tmp_path / run / "model.pt", weights_only=False)["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_train_missing_manifest_is_usage_error(tmp_path):
    assert main(["train", "--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2


def test_fine_tuning_from_the_shipped_model_keeps_frozen_layers(tmp_path):
    """`train --init CHECKPOINT --freeze backbone`: the convolutional layers (and their BatchNorm
    statistics) stay the shipped model's; the pooled head learns; the T-score scaling is the start's."""
    from osteoscreen.config import DEFAULT_MODEL
    m = synthesize("hip", 4, tmp_path / "local", seed=505, profiles="synthD", progress=False)
    out = tmp_path / "tuned"
    assert main(["train", "--manifest", str(m), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--val-fraction", "0.25", "--init", str(DEFAULT_MODEL), "--freeze", "backbone", "--lr", "5e-4",
                 "--quiet"]) == 0
    start = torch.load(DEFAULT_MODEL, weights_only=False)
    tuned = torch.load(out / "model.pt", weights_only=False)
    assert tuned["arch"] == start["arch"] and tuned["t_score_mean"] == start["t_score_mean"]
    assert tuned["trained_on"]["init"]["freeze"] == "backbone"
    for name, value in start["state_dict"].items():
        same = torch.equal(value, tuned["state_dict"][name])
        if name.startswith(("stem.", "stage1.", "stage2.", "context.", "stage3.")):
            assert same, name  # weights and BatchNorm statistics of the frozen backbone
    assert not torch.equal(start["state_dict"]["trunk.0.weight"], tuned["state_dict"]["trunk.0.weight"])
    assert main(["train", "--manifest", str(m), "--out", str(tmp_path / "x"), "--freeze", "early"]) == 2  # no --init
