"""`onp-fast demo` end to end at a tiny size: trains once, caches, repairs, prints the before/after table."""
from click.testing import CliRunner

from onp_fast.cli import main

TINY = ["--width", "0.125", "--epochs", "1", "--iterations", "1", "--defense-size", "60", "--quiet"]


def test_demo_trains_once_then_reuses_the_cached_model(tmp_path):
    cache = tmp_path / "cache"
    first = CliRunner().invoke(main, ["demo", "--cache-dir", str(cache), *TINY])
    assert first.exit_code == 0, first.output
    assert "training a backdoored model" in first.output
    for name in ("backdoored", "repaired"):
        line = next(l for l in first.output.splitlines() if l.strip().startswith(name))
        assert line.count("%") == 3
    assert len(list(cache.glob("*.repaired.pt"))) == 1 and len(list(cache.glob("*.attack.json"))) == 1
    second = CliRunner().invoke(main, ["demo", "--cache-dir", str(cache), *TINY])
    assert second.exit_code == 0, second.output
    assert "using the cached backdoored model" in second.output
    assert "training a backdoored model" not in second.output


def test_demo_graphs_prints_the_per_layer_summary():
    res = CliRunner().invoke(main, ["demo", "--graphs"])
    assert res.exit_code == 0, res.output
    assert "one op call for all layers" in res.output
