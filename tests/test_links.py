"""Links to content: how a gateway URL is spelled, which gateway is used, and the embedded
node's gateway port that stays the same for a data directory across restarts."""

from __future__ import annotations

import shutil
import socket
import urllib.request

import pytest
from helpers import world_traversable_tmpdir

from ipfs_execute_magic.cid import cid_base32
from ipfs_execute_magic.errors import UsageError
from ipfs_execute_magic.links import PUBLIC_GATEWAY, Gateway, as_gateway, link_gateway
from ipfs_execute_magic.node import GATEWAY_PORT_NAME, EmbeddedNode, stored_gateway_url
from ipfs_execute_magic.settings import Settings

CID = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"
# The same content as a CIDv0 (Kubo: `ipfs cid format -v 1 -b base32 QmUNLL...`).
CIDV0 = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
CIDV0_AS_V1 = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"


def test_path_style_urls() -> None:
    gateway = Gateway("https://gw.example/")
    assert gateway.base == "https://gw.example" and str(gateway) == "https://gw.example"
    assert gateway.url(CID) == f"https://gw.example/ipfs/{CID}"
    assert gateway.url(CID, "a dir/r&d.csv") == f"https://gw.example/ipfs/{CID}/a%20dir/r%26d.csv"
    assert gateway.path_url(f"/ipfs/{CID}/x") == f"https://gw.example/ipfs/{CID}/x"
    assert gateway.path_url("/ipns/docs.ipfs.tech/a") == "https://gw.example/ipns/docs.ipfs.tech/a"


def test_subdomain_style_urls() -> None:
    gateway = Gateway("https://dweb.link", "subdomain")
    assert gateway.url(CID) == f"https://{CID}.ipfs.dweb.link"
    assert gateway.url(CID, "sub/f.txt") == f"https://{CID}.ipfs.dweb.link/sub/f.txt"
    # A host name is case-insensitive: a CIDv0 becomes its base32 CIDv1.
    assert gateway.url(CIDV0) == f"https://{CIDV0_AS_V1}.ipfs.dweb.link"
    key = "k51qzi5uqu5dlvj2baxnqndepeb86cbk3ng7n3i46uzyxzyqj2xjonzllnv0v8"
    assert gateway.path_url(f"/ipns/{key}/a") == f"https://{key}.ipns.dweb.link/a"
    # A DNSLink name keeps the path form (its dots cannot be one label).
    assert gateway.path_url("/ipns/docs.ipfs.tech") == "https://dweb.link/ipns/docs.ipfs.tech"


def test_cid_base32_converts_every_base() -> None:
    assert cid_base32(CIDV0) == CIDV0_AS_V1
    assert cid_base32(CID) == CID
    base16 = "f01701220" + "5" * 64
    assert cid_base32(base16).startswith("bafybei")
    assert cid_base32("not-a-cid") == "not-a-cid"


def test_gateway_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("dweb.link", "ftp://x", "https://x/prefix", "https://x?y"):
        with pytest.raises(UsageError, match="gateway base URL"):
            Settings(gateway=bad)
    with pytest.raises(UsageError, match="gateway style"):
        Settings(gateway_style="sideways")
    monkeypatch.setenv("IPFS_EXECUTE_GATEWAY", "https://team.example/")
    monkeypatch.setenv("IPFS_EXECUTE_GATEWAY_STYLE", "subdomain")
    settings = Settings.from_env()
    assert link_gateway(settings) == Gateway("https://team.example", "subdomain")
    monkeypatch.setenv("IPFS_EXECUTE_GATEWAY_STYLE", "both")
    with pytest.raises(UsageError, match="IPFS_EXECUTE_GATEWAY_STYLE"):
        Settings.from_env()
    assert as_gateway("") == Gateway(PUBLIC_GATEWAY)


@pytest.mark.slow
def test_the_gateway_port_survives_a_restart_and_moves_when_taken(
    capfd: pytest.CaptureFixture[str],
) -> None:
    home = world_traversable_tmpdir("iex-gateway-")
    node = EmbeddedNode(Settings(home=home))
    try:
        assert stored_gateway_url(home) is None  # chosen at the first start
        node.ensure_running()
        url = stored_gateway_url(home)
        assert url is not None and url == (home / "kubo" / "gateway").read_text().strip()
        with urllib.request.urlopen(f"{url}/ipfs/bafkqaaa", timeout=10) as answer:
            assert answer.status == 200  # the empty identity CID, served on that port
        port = int(url.rsplit(":", 1)[1])
        assert 20000 <= port < 30000  # below the ephemeral range
        node.stop()
        node.ensure_running()
        assert stored_gateway_url(home) == url
        assert (home / "kubo" / "gateway").read_text().strip() == url
        node.stop()
        # Another process holds the port now: the next free one, said in one line, kept.
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            capfd.readouterr()
            node.ensure_running()
            err = capfd.readouterr().err
            moved = stored_gateway_url(home)
            assert moved is not None and moved != url
            assert (home / "kubo" / "gateway").read_text().strip() == moved
            assert f"gateway port {port} is taken" in err and len(err.strip().splitlines()) == 1
            assert (home / GATEWAY_PORT_NAME).read_text().strip() == moved.rsplit(":", 1)[1]
        # The links of this data directory use it, running or not.
        node.stop()
        assert link_gateway(Settings(home=home)) == Gateway(moved)
    finally:
        node.stop()
        shutil.rmtree(home, ignore_errors=True)
