"""The one backend decision: setting, option, auto-detection, bad values."""

import os
import stat

import pytest

from vif_route_qubes.errors import Failure
from vif_route_qubes.firewall import choose


def _fake_nft(tmp_path):
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\nexit 0\n")
    nft.chmod(nft.stat().st_mode | stat.S_IXUSR)
    return str(tmp_path)


def test_explicit_setting_wins_over_detection(tmp_path):
    assert choose({"VIF_ROUTE_QUBES_FIREWALL": "iptables", "PATH": _fake_nft(tmp_path)})[0] == "iptables"
    assert choose({"VIF_ROUTE_QUBES_FIREWALL": "nft", "PATH": "/nonexistent"})[0] == "nft"


def test_option_wins_over_environment():
    name, why = choose({"VIF_ROUTE_QUBES_FIREWALL": "nft"}, "iptables")
    assert (name, why) == ("iptables", "option --firewall=iptables")


def test_auto_picks_nft_when_installed_on_path(tmp_path):
    name, why = choose({"PATH": _fake_nft(tmp_path)})
    assert name == "nft" and "auto" in why


def test_auto_looks_in_sbin_beyond_a_short_path(monkeypatch):
    # libxl's PATH may lack /usr/sbin; detection must not depend on it
    seen = []
    monkeypatch.setattr(os, "access", lambda p, mode: seen.append(p) or p == "/usr/sbin/nft")
    assert choose({"PATH": "/bin"})[0] == "nft"
    assert "/bin/nft" in seen


def test_auto_without_nft_is_iptables(monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    name, why = choose({"PATH": "/bin"})
    assert name == "iptables" and "no nft" in why


@pytest.mark.parametrize("bad", ["x", "NFT", "iptables-legacy", "nft;rm"])
def test_bad_setting_is_one_clear_line(bad):
    with pytest.raises(Failure) as exc:
        choose({"VIF_ROUTE_QUBES_FIREWALL": bad})
    assert "VIF_ROUTE_QUBES_FIREWALL" in str(exc.value) and "iptables, nft, auto" in str(exc.value)
