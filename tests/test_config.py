import pytest

from osteoscreen.cli import main
from osteoscreen.config import ConfigError, Destination, load


def test_precedence_file_env_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 2000\nae_title: FROMFILE\nsettle_seconds: 3\noutput:\n  heatmaps: false\n")
    s = load(cfg, environ={"OSTEOSCREEN_PORT": "3000", "OSTEOSCREEN_OUTPUT__SERIES_NUMBER_SR": "77"})
    assert (s.port, s.ae_title, s.settle_seconds, s.output.heatmaps, s.output.series_number_sr) == (3000, "FROMFILE", 3.0, False, 77)
    s = load(cfg, {"port": 4000, "destinations": [Destination.parse("PACS@h:104")]}, environ={"OSTEOSCREEN_PORT": "3000"})
    assert s.port == 4000 and str(s.destinations[0]) == "PACS@h:104"


def test_destinations_from_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("destinations:\n  - PACS@10.0.0.5:104\n  - {ae_title: B, host: h, port: 11}\n")
    s = load(cfg, environ={})
    assert [str(d) for d in s.destinations] == ["PACS@10.0.0.5:104", "B@h:11"]


@pytest.mark.parametrize("text", ["port: notanumber\n", "nosuchkey: 1\n", "ae_title: ''\n", "port: 70000\n",
                                  "destinations: [bogus]\n", "- a list\n", "device: tpu\n", "decode_threads: -1\n", "model_precision: fp16\n"])
def test_bad_config_is_a_clear_error(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load(cfg, environ={})


def test_cli_bad_config_exits_2_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: [1, 2]\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["serve", "--destination", "nonsense"]) == 2
