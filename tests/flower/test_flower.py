"""Flower as a transport of the round engine: the same rounds as in-process, adapters of
several ranks aggregated by HetLoRA and FlexLoRA inside a Flower ServerApp."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra: pip install 'edge-runtime[flower]'")

from edge_runtime.config import RunConfig, load_run_file  # noqa: E402
from edge_runtime.fleet.codec import decode_adapter  # noqa: E402
from edge_runtime.simulation import run_simulation  # noqa: E402

EXAMPLE = Path(__file__).parents[2] / "examples" / "flower" / "run.toml"


def _run(strategy: str, data: Path, transport: str, state: Path) -> dict:
    """The example's run file, on the vendored data, with `strategy` and `transport`."""
    d = load_run_file(EXAMPLE)
    d["strategy"] = {"name": strategy}
    d["data"] = {**d["data"], "path": str(data)}
    d["sim"] = {**d["sim"], "transport": transport}
    return run_simulation(RunConfig.from_dict(d), state_dir=state)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_flower_rounds_match_the_round_engine(strategy: str, data_dir: Path,
                                              tmp_path: Path) -> None:
    a = _run(strategy, data_dir, "inproc", tmp_path / "inproc")
    b = _run(strategy, data_dir, "flower", tmp_path / "flower")
    ranks = {p["max_rank"] for p in b["fleet"]["plans"].values()}
    assert len(ranks) >= 2  # adapters of several ranks were aggregated
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert rb["participants"] == ra["participants"]
        assert (ra["bytes_up"], ra["bytes_down"]) == (rb["bytes_up"], rb["bytes_down"])
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], abs=1e-5)
    ga, _ = decode_adapter((tmp_path / "inproc" / "global_r2.safetensors").read_bytes())
    gb, _ = decode_adapter((tmp_path / "flower" / "global_r2.safetensors").read_bytes())
    assert set(ga) == set(gb)
    worst = max(float((ga[n].delta() - gb[n].delta()).abs().max()) for n in ga)
    assert worst <= 1e-5, worst
    assert a["rounds"][-1]["eval_loss"] != a["rounds"][0]["eval_loss"]  # it trained
