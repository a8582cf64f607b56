"""DICOMweb (STOW-RS) destinations in the settings (issue 17): the list and command-line form (a base
URL), the mapping form with credentials from the environment (also as OSTEOSCREEN_DESTINATIONS, a
YAML list), what a child process is given (dump), and bad entries: each a ConfigError that says what
is wrong and never repeats a secret. Sending to them: tests/test_dicomweb_send.py."""
from __future__ import annotations

import pytest
import yaml

from osteoscreen.cli import build_parser, main
from osteoscreen.cli.common import _settings
from osteoscreen.config import ConfigError, Destination, DicomWebDestination, dump, load

SECRET = "hunter2-secret"


def test_list_mapping_env_and_command_line_forms(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""destinations:
  - PACS@10.0.0.5:104
  - PACS@10.0.0.6:2762?tls
  - HTTPS://pacs.example.org/dicom-web/
  - {{url: "https://vna.example.org/dicomweb", auth: basic, username: osteo, password_env: VNA_PASSWORD,
     ca_certificates: "{ca}"}}
  - {{url: "http://127.0.0.1:8042/dicom-web", auth: bearer, token_env: VNA_TOKEN, timeout: 5}}
""")
    s = load(cfg, environ={"VNA_PASSWORD": SECRET, "VNA_TOKEN": "tok-1"})
    assert [str(d) for d in s.destinations] == [
        "PACS@10.0.0.5:104", "PACS@10.0.0.6:2762?tls", "https://pacs.example.org/dicom-web",
        "https://vna.example.org/dicomweb", "http://127.0.0.1:8042/dicom-web"]
    assert [type(d) for d in s.destinations] == [Destination] * 2 + [DicomWebDestination] * 3
    assert s.destinations[1].tls and not s.destinations[0].tls
    plain, vna, bearer = s.destinations[2:]
    assert (plain.auth, plain.secret()) == ("none", None)
    assert (vna.auth, vna.username, vna.secret({"VNA_PASSWORD": SECRET}), vna.ca_certificates) == (
        "basic", "osteo", SECRET, str(ca))
    assert (bearer.auth, bearer.secret({"VNA_TOKEN": "tok-1"}), bearer.timeout) == ("bearer", "tok-1", 5)
    inline = DicomWebDestination("https://h/dw", auth="basic", username="u", password=SECRET)
    assert SECRET not in repr(inline) and inline.secret() == SECRET

    # a child process gets the environment variable's name, never its value, and loads the same
    dumped = dump(s)
    assert dumped["destinations"][3] == {"url": "https://vna.example.org/dicomweb", "auth": "basic",
                                         "username": "osteo", "password_env": "VNA_PASSWORD",
                                         "ca_certificates": str(ca)}
    assert SECRET not in yaml.safe_dump(dumped)
    again = tmp_path / "dumped.yaml"
    again.write_text(yaml.safe_dump(dumped))
    assert load(again, environ={"VNA_PASSWORD": "x", "VNA_TOKEN": "y"}).destinations == s.destinations

    env = load(None, environ={"OSTEOSCREEN_DESTINATIONS": "PACS@h:104, https://pacs.example.org/dicom-web"})
    assert [str(d) for d in env.destinations] == ["PACS@h:104", "https://pacs.example.org/dicom-web"]
    mapping = '[PACS@10.0.0.5:104, {url: "https://vna.example.org/dicomweb", auth: basic, username: osteo, ' \
              'password_env: VNA_PASSWORD, ca_certificates: "%s"}]' % ca
    assert load(None, environ={"OSTEOSCREEN_DESTINATIONS": mapping}).destinations == [s.destinations[0], vna]
    with pytest.raises(ConfigError) as caught:
        load(None, environ={"OSTEOSCREEN_DESTINATIONS": f"[{{url: https://h/dw, password: '{SECRET}}}]"})
    assert "not a YAML list" in str(caught.value) and SECRET not in str(caught.value)
    args = build_parser().parse_args(["dispatch", "--destination", "https://pacs.example.org/dicom-web",
                                      "--destination", "PACS@h:104"])
    assert [str(d) for d in _settings(args).destinations] == ["https://pacs.example.org/dicom-web", "PACS@h:104"]


BAD = [
    ('["https://osteo:hunter2-secret@pacs/dicom-web"]', "credentials do not belong in the URL"),
    ('["https://osteo:hunter2-secret@pacs:99999/dw"]', "credentials do not belong in the URL"),
    ('["ftp://pacs/dicom-web"]', "http:// or https://"),
    ('["https://:8042/dicom-web"]', "with a host"),
    ('["https://pacs:99999/dicom-web"]', "not a valid URL"),
    ('["https://pacs/dicom-web?x=1"]', "no query"),
    (f'["https://pacs/{"x" * 130}"]', "longer than 128"),
    ('["bogus"]', "is not AET@HOST:PORT, AET@HOST:PORT?tls or a DICOMweb base URL"),
    ("[42]", "each destination is"),
    ("[{url: null}]", "is not a URL"),
    ("[{url: https://pacs/dw, pasword_env: X}]", "pasword_env"),
    ("[https://pacs/dw, https://pacs/dw/]", "appears twice"),
    ("[{url: https://pacs/dw, auth: digest}]", "auth 'digest' must be one of none, basic, bearer"),
    ("[{url: https://pacs/dw, auth: basic, password_env: VNA_PASSWORD}]", "needs a username"),
    ("[{url: https://pacs/dw, auth: basic, username: u}]", "needs exactly one of password_env"),
    ("[{url: https://pacs/dw, auth: basic, username: u, password: hunter2-secret, password_env: VNA_PASSWORD}]",
     "needs exactly one of password_env"),
    ("[{url: https://pacs/dw, auth: bearer, token_env: OSTEOSCREEN_TOKEN}]", "not OSTEOSCREEN_"),
    ("[{url: https://pacs/dw, auth: bearer, token_env: 'BAD NAME'}]", "must name an environment variable"),
    ("[{url: https://pacs/dw, token_env: VNA_TOKEN}]", "token_env do not go with auth none"),
    ("[{url: https://pacs/dw, auth: basic, username: u, password_env: VNA_PASSWORD, token: hunter2-secret}]",
     "token do not go with auth basic"),
    ("[{url: https://pacs/dw, ca_certificates: /nonexistent/ca.pem}]", "ca_certificates file /nonexistent/ca.pem"),
    (f"[{{url: http://pacs/dw, ca_certificates: {__file__}}}]", "applies to https:// URLs only"),
    ("[{url: https://pacs/dw, timeout: 0}]", "timeout must be a number of seconds"),
    ("[{url: https://pacs/dw, timeout: soon}]", "timeout must be a number of seconds"),
]


@pytest.mark.parametrize("entries,message", BAD)
def test_bad_destinations_are_clear_errors_without_secrets(tmp_path, entries, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"destinations: {entries}\n")
    with pytest.raises(ConfigError) as caught:
        load(cfg, environ={"VNA_PASSWORD": SECRET, "VNA_TOKEN": SECRET})
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_the_cli_refuses_a_bad_url_with_exit_2(capsys):
    assert main(["dispatch", "--destination", "ftp://pacs/dicom-web"]) == 2
    assert "http:// or https://" in capsys.readouterr().err


def test_only_the_dispatch_role_needs_the_secret_and_it_refuses_to_start_without(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("destinations: [{url: https://pacs/dw, auth: bearer, token_env: STOW_TEST_UNSET_TOKEN}]\n")
    monkeypatch.delenv("STOW_TEST_UNSET_TOKEN", raising=False)
    assert [str(d) for d in load(cfg).destinations] == ["https://pacs/dw"]  # web, worker, listener: no secret
    assert main(["dispatch", "--config", str(cfg), "--storage", str(tmp_path / "var")]) == 2
    assert "environment variable STOW_TEST_UNSET_TOKEN is not set" in capsys.readouterr().err
