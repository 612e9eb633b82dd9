"""Progress output (onp_fast.progress): phase lines and bars go to stderr only, bars show an ETA, appear only when
progress is asked for, and leave every result bit-identical."""
import contextlib
import io
import re

import pytest
import torch
from torch import nn

from onp_fast.defenses.anp import ANPConfig, anp_masks
from onp_fast.defenses.onp.defense import ONPConfig, onp_scores
from onp_fast.defenses.rnp import rnp_scores
from onp_fast.prepare import Phase, RepairConfig, finetune_pruned, prepare
from onp_fast.prepare.trigger import trigger_setting
from onp_fast.progress import bar, note
from onp_fast.repair import RewardWeights, choose_depth

pytestmark = pytest.mark.usefixtures("one_thread")

ETA = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d")  # tqdm's "n/total [elapsed<remaining"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 4


def _captured(fn, *a, **kw):
    """-> (fn's result, what it wrote to stdout, to stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        res = fn(*a, **kw)
    return res, out.getvalue(), err.getvalue()


CFG = RepairConfig(reward_batch=32, weights=RewardWeights(ca_p=1.0))  # every prepare phase runs, perturbations too


@pytest.fixture(scope="module")
def prepared():
    """prepare() on the same model and data with progress on and off -> {on: (ctx, stdout, stderr)}."""
    x, y = _data()
    return {on: _captured(prepare, _model(), x, y, 4, CFG, progress=on) for on in (True, False)}


def test_prepare_with_progress_writes_phase_lines_and_bars_to_stderr_only(prepared):
    ctx, out, err = prepared[True]
    assert out == ""
    lines = [l for l in err.splitlines() if l.startswith("[onp] ")]
    assert lines == [f"[onp] {p} ..." for p in ("split", "groups", "unlearn", "trigger", "perturbations")]
    trigger_at = err.index("[onp] trigger ...")
    steps = trigger_setting(ctx.x_opt.shape)[0]
    assert "trigger proxies:" in err[trigger_at:] and f"/{steps} [" in err[trigger_at:]  # its bar
    assert err.index("unlearn:") > err.index("[onp] unlearn ...")
    assert "perturbations:" in err[err.index("[onp] perturbations ..."):]
    assert set(ctx.times) == {"split", "groups", "unlearn", "trigger", "perturbations"}
    _, out_off, err_off = prepared[False]
    assert out_off == "" and err_off == ""  # progress off: silent


def test_prepare_results_are_identical_with_progress_on_and_off(prepared):
    on, off = prepared[True][0], prepared[False][0]
    for f in on.proxies.norms:
        assert torch.equal(on.proxies.norms[f], off.proxies.norms[f])
        assert torch.equal(on.proxies.patterns[f], off.proxies.patterns[f])
    assert torch.equal(on.proxies.masks, off.proxies.masks)
    assert on.unlearn_info == off.unlearn_info
    for (k, a), b in zip(on.unlearned.state_dict().items(), off.unlearned.state_dict().values()):
        assert torch.equal(a, b), k
    assert on.perturbations is not None and torch.equal(on.perturbations, off.perturbations)


def test_finetune_and_baseline_loops_are_identical_with_progress_and_show_their_bars(prepared):
    ctx = prepared[False][0]
    x, y = ctx.defense_set()
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    prune[:2] = True

    def tune(progress):
        return finetune_pruned(_model(), ctx.groups, prune, x, y, epochs=2, batch_size=16, rho=0.5,
                               progress=progress).state_dict()

    quiet, out, err = _captured(tune, False)
    assert out == err == ""
    shown, out, err = _captured(tune, True)
    assert out == "" and "fine-tune:" in err and "/8 [" in err  # 2 epochs x 4 batches of 16 among 60
    assert all(torch.equal(a, b) for a, b in zip(quiet.values(), shown.values()))

    anp = ANPConfig(iterations=6, batch_size=16)
    masks, _, err = _captured(anp_masks, ctx.model, ctx.x_opt, ctx.y_opt, anp, progress=True)
    assert "anp masks:" in err and "/6 [" in err
    plain = anp_masks(ctx.model, ctx.x_opt, ctx.y_opt, anp)
    assert all(torch.equal(masks[k], plain[k]) for k in plain)

    kw = dict(epochs=2, batch_size=16)
    scores, _, err = _captured(rnp_scores, ctx.unlearned, ctx.groups, ctx.x_opt, ctx.y_opt, progress=True, **kw)
    assert "rnp recover:" in err and "/6 [" in err  # 2 epochs x 3 batches of 16 among 48
    assert torch.equal(scores, rnp_scores(ctx.unlearned, ctx.groups, ctx.x_opt, ctx.y_opt, **kw))


def test_policy_phase_shows_its_bar_on_stderr(prepared):
    ctx = prepared[True][0]
    onp = ONPConfig(iterations=3, samples=2)
    (prob, _), out, err = _captured(onp_scores, ctx, onp)
    assert out == "" and "[onp] policy ..." in err and "policy (RL):" in err and "/3 [" in err
    ctx.progress = False
    try:
        (quiet, _), _, err = _captured(onp_scores, ctx, onp)
    finally:
        ctx.progress = True
    assert err == "" and torch.equal(prob, quiet)


def test_depth_rule_shows_a_bar_over_its_depths_and_chooses_the_same():
    class Scorer:  # reward rises with depth until CA_B falls past 20
        weights = RewardWeights(ca_b=1, ca_t=1, sparsity=0)

        def terms(self, prune):
            d = prune.sum(1).float()
            z = torch.zeros_like(d)
            return {"ca_b": torch.where(d > 20, 0.5 * torch.ones_like(d), torch.ones_like(d)),
                    "ca_t": torch.clamp(d / 20, max=1.0), "ca_u": z, "ca_p": z, "sparsity": z}

        def standard_error(self, prune):
            return 0.0

    prob = torch.linspace(1, 0, 60)
    choice, out, err = _captured(choose_depth, prob, Scorer(), max_depth=40, chunk=8, progress=True)
    assert out == "" and "depth rule:" in err and re.search(r"\d+/\d+ \[", err)
    again, _, err = _captured(choose_depth, prob, Scorer(), max_depth=40, chunk=8)
    assert err == "" and choice["depth"] == again["depth"] == 20 and choice["table"] == again["table"]


def test_bar_shows_an_eta_on_stderr_only_when_enabled_and_not_tiny():
    def run(total, enabled):
        with bar(total, "demo", enabled) as b:
            for _ in range(min(total, 3)):
                b.update(1)
            b.refresh()  # draw now, whatever the redraw interval

    _, out, err = _captured(run, 10, True)
    drawn = [d for d in err.split("\r") if d.strip()]
    assert out == "" and drawn and all(d.startswith("demo:") for d in drawn)
    assert "3/10 [" in drawn[-1] and ETA.search(drawn[-1])  # the last drawing: 3 of 10, elapsed<remaining
    assert "<?" in drawn[0] and "<?" not in drawn[-1]  # no rate before the first step; then a remaining time
    assert err.endswith("\r") and not err.split("\r")[-2].strip()  # leave=False: blanked when it closes
    assert _captured(run, 10, False)[1:] == ("", "")
    assert _captured(run, 1, True)[1:] == ("", "")  # one step: no bar


def test_phase_and_note_write_to_stderr():
    times = {}
    (_, out, err) = _captured(lambda: Phase("trigger", times, True).__enter__().__exit__(None, None, None))
    assert out == "" and err == "[onp] trigger ...\n" and "trigger" in times
    assert _captured(lambda: Phase("x", {}, False).__enter__())[1:] == ("", "")
    assert _captured(note, "hello")[1:] == ("", "hello\n")
