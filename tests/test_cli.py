"""Every console script speaks the same dialect: --version, a short --help, --device / --workers wording."""
import configparser
import importlib
import os
from importlib.metadata import version

import pytest

from segswap.core.cli import DEVICE_HELP, LOADER_WORKERS_HELP, WORKERS_HELP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_HELP_LINES = 110  # at 100 columns; the rarely used groups are behind --help-all


def _scripts() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = [ln for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
    return dict((part.strip() for part in ln.split("=")) for ln in lines)


SCRIPTS = _scripts()


def _run(target: str, args: list[str], capsys) -> tuple[int, str]:
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code or 0, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version_and_short_help(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out = _run(SCRIPTS[name], ["--version"], capsys)
    assert code == 0 and out.strip() == f"{name} {version('segswap')}"
    code, out = _run(SCRIPTS[name], ["--help"], capsys)
    assert code == 0 and len(out.splitlines()) <= MAX_HELP_LINES, f"{name} --help: {len(out.splitlines())} lines"
    for flag, wordings in (("--device", [DEVICE_HELP]), ("--workers", [WORKERS_HELP, LOADER_WORKERS_HELP])):
        if flag in out:  # commands that take the option describe it with the shared wording
            flat = " ".join(out.split())
            assert any(" ".join(w.split())[:40] in flat for w in wordings), f"{name} {flag}"


def test_help_all_shows_the_hidden_groups(capsys):
    _, short = _run(SCRIPTS["segswap-train"], ["--help"], capsys)
    _, full = _run(SCRIPTS["segswap-train"], ["--help-all"], capsys)
    assert "--eta" not in short and "--eta" in full and "--hardneg-pool" in full


def test_hidden_options_still_parse():
    from segswap.train.cli import config_from_args, get_args_parser

    cfg = config_from_args(get_args_parser().parse_args(["--shards", "x.tar", "--out", "r", "--eta", "3"]))
    assert cfg["loss"]["eta"] == 3
