"""The cluster simulator (tools/sim_p2p.py) on a dozen nodes: it drives the real placement, holder, ordering
and origin gate code, and the figures the issue sets as goals hold at this scale (issue 11)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from modelcache.p2p.gate import Gate
from modelcache.p2p.holders import Holders

TOOL = Path(__file__).resolve().parent.parent / "tools" / "sim_p2p.py"
MiB = 1 << 20


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("sim_p2p", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_p2p"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("sim_p2p", None)


@pytest.mark.parametrize("scenario", ["all at once", "10% leave mid-pull", "arrive in 4 waves"])
def test_every_node_gets_the_model_and_the_origin_serves_it_about_once(sim, scenario: str) -> None:
    cfg = sim.Config(12, model=1024 * MiB, **sim.SCENARIOS[scenario])
    result = sim.simulate(cfg)
    figures = result.ratios()
    leavers = round(cfg.leave * cfg.nodes) if cfg.leave else 0
    assert len(result.durations) == cfg.nodes - leavers  # every node that stayed has the whole model
    assert result.from_peers > 0 and result.redirects > 0  # peers served, and homes sent requesters on
    assert figures["origin"] >= 1.0  # the origin served every byte at least once
    # Goals (issue 11): the origin serves the model about once; the slowest node within Kraken's 1.8x
    # of a solo pull; the busiest uploader within 2x of the mean, as the multi-daemon tests require.
    assert figures["origin"] <= 1.05
    assert figures["slowest"] <= 1.8
    assert figures["upload"] <= 2.0


def test_the_simulator_drives_the_real_holder_bookkeeping(sim, monkeypatch) -> None:
    """Patching the real Holders changes what the simulator does: it measures that code, not a copy."""
    cfg = sim.Config(12, model=256 * MiB)
    tree = sim.simulate(cfg)
    monkeypatch.setattr(Holders, "next_holder", lambda self, key, requester: None)  # homes serve everyone
    star = sim.simulate(cfg)
    assert tree.redirects > 0 and star.redirects == 0
    assert len(star.durations) == cfg.nodes and star.ratios()["origin"] == pytest.approx(1.0)


def test_the_simulator_sizes_each_home_s_origin_gate_with_the_real_gate(sim, monkeypatch) -> None:
    """The homes' origin reads pass each node's real Gate: about one stream per home here (8 x its share of
    the pieces), far more when the gate is patched to one node's 8."""
    cfg = sim.Config(12, model=1024 * MiB)
    gated = sim.simulate(cfg)
    monkeypatch.setattr(Gate, "limit", lambda self: 8)
    wide = sim.simulate(cfg)
    assert gated.ratios()["origin"] == pytest.approx(1.0) and len(wide.durations) == cfg.nodes
    # A home piece a requester waited on goes in over the limit (hurried): a few more than one per node.
    assert gated.extra["peak origin streams"] <= 2 * cfg.nodes < wide.extra["peak origin streams"]


def test_a_home_relays_a_piece_to_its_requesters_while_it_arrives(sim, monkeypatch) -> None:
    """Requesters stream a home's piece from it while the origin sends it (p2p/relay.py), no faster than it
    arrives; with no relay budget they wait until it is whole, and every node still gets the model."""
    cfg = sim.Config(12, model=1024 * MiB)
    relayed = sim.simulate(cfg)
    assert relayed.extra["relayed"] > 0
    monkeypatch.setattr(sim, "RELAY_BUDGET", 0)
    whole = sim.simulate(cfg)
    assert whole.extra["relayed"] == 0 and len(whole.durations) == cfg.nodes
    assert whole.ratios()["origin"] == pytest.approx(1.0)
