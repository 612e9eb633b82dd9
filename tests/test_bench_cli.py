"""`onp-fast bench`: table and JSON entries for the op and its reference (on small shapes here, for speed)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from onp_fast.bench import Case, format_table, run_cases
from onp_fast.bench import graphs as bench_graphs
from onp_fast.cli import main


def small_weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 3, 3, generator=g), torch.randn(32, 16, 3, 3, generator=g),
            torch.randn(10, 32, generator=g)]


def test_bench_quick_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_graphs, "preactresnet18_weights", small_weights)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "graphs", "--json", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())
    impls = {(e["name"], e["impl"]) for e in entries}
    names = {e["name"] for e in entries}
    assert names and all(n.startswith("neuron_graphs/preactresnet18/") for n in names)
    for n in names:
        assert (n, "reference") in impls and (n, "op_cpu") in impls
    for e in entries:
        assert e["median_s"] > 0 and e["min_s"] <= e["median_s"] and e["edges"] > 0
        if e["impl"] == "op_cpu":
            assert e["baseline"] == "reference" and e["speedup"] > 0
    assert "speedup" in result.output and "op_cpu" in result.output


def test_bench_json_error_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--quick", "--json", str(tmp_path / "missing" / "out.json")])
    assert result.exit_code == 2


def test_bench_unknown_module_is_a_user_error():
    result = CliRunner().invoke(main, ["bench", "--only", "nope"])
    assert result.exit_code == 2


def test_run_cases_speedup_and_table():
    entries = run_cases([Case("w", "slow", lambda: sum(range(20000)), repeats=3),
                         Case("w", "fast", lambda: None, baseline="slow", repeats=3)])
    assert entries[0]["speedup"] is None and entries[1]["speedup"] > 1
    table = format_table(entries)
    assert "(baseline)" in table and "x vs slow" in table


def test_preactresnet18_shapes():
    w = bench_graphs.preactresnet18_weights()
    assert len(w) == 21 and tuple(w[0].shape) == (64, 3, 3, 3) and tuple(w[-1].shape) == (10, 512)


def test_bench_policy_rows_show_backend_and_throughput(tmp_path, monkeypatch):
    from onp_fast.bench import policy as bench_policy

    monkeypatch.setattr(bench_policy, "K", 3)
    monkeypatch.setattr(bench_policy, "N_IMAGES", 20)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "policy", "--json", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())
    assert [e["impl"] for e in entries] == ["hooks", "engine", "engine_bf16"]
    assert all(e["name"].startswith("repair policy phase") and "digits" in e["name"] for e in entries)
    hooks, engine, low = entries
    assert engine["baseline"] == low["baseline"] == "hooks" and engine["speedup"] > 0 and hooks["speedup"] is None
    assert [e["precision"] for e in entries] == ["float32", "float32", "bfloat16"]
    for e in entries:
        assert e["backend"] == e["impl"].split("_")[0] and e["K"] == 3 and e["images_per_mask"] > 20  # clean + stamped
        assert e["masks_per_s"] > 0 and e["images_per_s"] == pytest.approx(e["masks_per_s"] * e["images_per_mask"],
                                                                          rel=0.01)
    assert "masks/s" in result.output and "engine" in result.output


def test_bench_policy_backends_score_the_same_rewards(monkeypatch):
    from onp_fast.bench import policy as bench_policy

    monkeypatch.setattr(bench_policy, "K", 3)
    monkeypatch.setattr(bench_policy, "N_IMAGES", 20)
    hooks, engine, low = bench_policy.cases(quick=True)
    torch.testing.assert_close(engine.fn(), hooks.fn(), rtol=0, atol=1e-5)
    torch.testing.assert_close(low.fn(), hooks.fn(), rtol=0, atol=0.02)  # bfloat16: close, not equal
