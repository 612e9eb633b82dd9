"""--device and --max-memory on every command that runs a model (issue 18): checked before any work with one-line
errors; `--device cpu` is the default, bit for bit; the budget reaches the reward engine, evaluation and the
training-batch check on the real path, and splitting batches under it leaves the numbers unchanged; the repair
report and compare's JSON carry the peak memory."""
import gc
import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from train_helpers import block_pixels, fit

import onp_fast.reward.engine as engine_mod
from onp_fast import attacks, models
from onp_fast.cli import main
from onp_fast.data import normalize
from onp_fast.defenses import ONPConfig
from onp_fast.errors import UserError
from onp_fast.groups import find_groups
from onp_fast.io import save_model
from onp_fast.memory import MODEL_COPIES, activation_bytes, fit_batch, parse_memory, reserved_bytes
from onp_fast.prepare import RepairConfig, accuracy_of, prepare
from onp_fast.repair import repair
from onp_fast.reward import GroupPoints, RewardEngine, RewardWeights

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES, MEAN, STD = 4, (0.4,), (0.25,)
ONP_FAST = ["--iterations", "2", "--samples", "4", "--purify", "none", "--quiet", "--skip-accuracy-check"]


def _pixels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return block_pixels(n, seed, step=4)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("preactresnet18", num_classes=NUM_CLASSES, in_channels=1, width=0.125, input_size=8).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny PreActResNet-18 (width 0.125, 8x8) trained a few epochs, saved with its normalisation; an npz data
    set (120 train, 80 test images) and a BadNets attack spec for it."""
    root = tmp_path_factory.mktemp("devmem")
    x, y = _pixels(120, seed=1)
    m = _model()
    fit(m, normalize(x, MEAN, STD), y, epochs=4)
    test_x, test_y = _pixels(80, seed=2)
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy(), x_test=test_x.numpy(), y_test=test_y.numpy())
    save_model(m, root / "m.pt", mean=MEAN, std=STD)
    attack = attacks.build("badnets", (1, 8, 8), seed=0, size=2)
    (root / "m.attack.json").write_text(json.dumps({"attack": attack.spec(), "target": 0}))
    return {"model": root / "m.pt", "data": f"npz:{root / 'data.npz'}", "spec": root / "m.attack.json",
            "module": m, "test": (test_x, test_y), "attack": attack}


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _command(name: str, files, out) -> list:
    """The command line of `name` on the fixture's model and data, writing under the folder `out`."""
    base = [name, files["model"], "--dataset", files["data"]]
    return {"repair": base + ["--out", out / "o.pt"],
            "compare": base + ["--attack-spec", files["spec"], "--json", out / "r.json"],
            "evaluate": base,
            "scan": base + ["--image", out / "s.png"]}[name]


# (a) every bad value: one line, exit 2, nothing read or written

BAD = [(["--device", "tpu"], ["--device", "unknown device 'tpu'"]),
       (["--device", "cuda:x"], ["--device", "unknown device 'cuda:x'"]),
       (["--device", "gpu"], ["--device", "cpu, cuda or cuda:N"]),
       (["--max-memory", "abc"], ["--max-memory", "bad memory size 'abc'"]),
       (["--max-memory", "12 parsecs"], ["--max-memory", "bad memory size"]),
       (["--max-memory", "0"], ["--max-memory", "at least one byte"]),
       (["--max-memory", "-1GB"], ["--max-memory", "bad memory size"]),
       (["--max-memory", "0.4"], ["--max-memory", "at least one byte"])]
if not torch.cuda.is_available():  # this machine: CPU-only torch
    BAD += [(["--device", "cuda"], ["--device", "CUDA is not available", "torch.cuda.is_available() is False"]),
            (["--device", "cuda:0"], ["--device", "CUDA is not available"])]


@pytest.mark.parametrize("command", ["repair", "compare", "evaluate", "scan"])
@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_device_or_budget_is_one_line_before_anything_is_read(command, args, needles, files, tmp_path,
                                                                   monkeypatch):
    import onp_fast.io

    monkeypatch.setattr(onp_fast.io, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    one_line_error(_run([*_command(command, files, tmp_path), *args]), *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["repair", "compare", "evaluate", "scan"])
def test_a_cuda_index_past_the_device_count_is_one_line(command, files, tmp_path, monkeypatch):
    """With CUDA present (faked: one device), cuda:1 names the devices there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line_error(_run([*_command(command, files, tmp_path), "--device", "cuda:1"]),
                   "--device", "1 CUDA device", "cuda:0 to cuda:0")
    assert list(tmp_path.iterdir()) == []


def test_the_library_checks_device_and_budget_too():
    for bad, needle in (({"device": "tpu"}, "unknown device"), ({"max_memory": "lots"}, "bad memory size"),
                        ({"max_memory": 0}, "at least one byte")):
        with pytest.raises(UserError, match=needle):
            RepairConfig(**bad).check()
    assert RepairConfig(device="CPU").check().device == "cpu"
    cfg = RepairConfig()
    assert (cfg.device, cfg.max_memory) == ("cpu", None)


def test_compare_checks_a_device_given_as_a_param_before_anything_is_read(files, tmp_path, monkeypatch):
    import onp_fast.io

    monkeypatch.setattr(onp_fast.io, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    one_line_error(_run([*_command("compare", files, tmp_path), "--param", "repair.device=tpu"]), "unknown device")
    one_line_error(_run([*_command("compare", files, tmp_path), "--param", "repair.max_memory=lots"]),
                   "bad memory size")
    assert list(tmp_path.iterdir()) == []


# (b) --device cpu is the default, bit for bit; (e) the report's peak memory

def _strip_run(report: dict) -> dict:
    """The report without what differs between two runs of the same repair: seconds and the process's memory."""
    out = json.loads(json.dumps(report))
    for key in ("times_s", "method_times_s", "scoring_times_s", "peak_memory", "output"):
        out.pop(key)
    out["details"].pop("policy_reward")
    return out


def test_device_cpu_gives_the_same_masks_and_report_as_no_flag(files, tmp_path):
    runs = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        out = tmp_path / name / "o.pt"
        out.parent.mkdir()
        res = _run(["repair", files["model"], "--dataset", files["data"], "--out", out, "--defense-size", "60",
                    *ONP_FAST, *extra])
        assert res.exit_code == 0, res.output
        runs[name] = (json.loads((out.parent / "o.masks.json").read_text()),
                      json.loads((out.parent / "o.report.json").read_text()))
    (masks_a, report_a), (masks_b, report_b) = runs["default"], runs["cpu"]
    assert masks_a == masks_b
    assert _strip_run(report_a) == _strip_run(report_b)
    assert report_b["config"]["device"] == "cpu" and report_b["config"]["max_memory"] is None
    assert report_a["stopping_rule"]["table"]  # the numbers compared are there


def test_the_report_and_the_summary_carry_the_peak_memory(files, tmp_path):
    out = tmp_path / "o.pt"
    res = _run(["repair", files["model"], "--dataset", files["data"], "--out", out, "--defense-size", "60",
                "--method", "clp", "--purify", "none", "--skip-accuracy-check", "--max-memory", "2GB"])
    assert res.exit_code == 0, res.output
    part = json.loads((tmp_path / "o.report.json").read_text())["peak_memory"]
    assert part["rss_bytes"] > 10 * 2**20  # a Python process with torch loaded: tens of MiB at least
    assert part["cuda_max_allocated_bytes"] is None  # on the CPU
    assert (part["device"], part["max_memory"], part["max_memory_bytes"]) == ("cpu", "2GB", 2 * 10**9)
    line = [s for s in res.output.splitlines() if s.startswith("peak memory:")]
    assert len(line) == 1 and "resident" in line[0] and "--max-memory 2GB" in line[0], res.output


def test_compare_json_carries_the_peak_memory(files, tmp_path):
    out = tmp_path / "r.json"
    res = _run(["compare", files["model"], "--dataset", files["data"], "--attack-spec", files["spec"], "--json", out,
                "--methods", "clp", "--reactivation-epochs", "0", "--retune-epochs", "0", "--defense-size", "40",
                "--param", "repair.purify=none", "--skip-accuracy-check", "--quiet", "--max-memory", "2GB"])
    assert res.exit_code == 0, res.output
    part = json.loads(out.read_text())["peak_memory"]
    assert part["rss_bytes"] > 10 * 2**20 and part["max_memory_bytes"] == 2 * 10**9
    assert part["device"] == "cpu" and part["cuda_max_allocated_bytes"] is None


# (c) the budget reaches the reward engine on the repair path, and chunks leave the rewards as they were

def _chunks_seen(monkeypatch) -> list:
    """Records (K, images, masks run at once) of every RewardEngine.chunk call."""
    seen = []
    real = engine_mod.RewardEngine.chunk

    def chunk(self, k, images):
        c = real(self, k, images)
        seen.append((k, len(images), c))
        return c

    monkeypatch.setattr(engine_mod.RewardEngine, "chunk", chunk)
    return seen


def test_max_memory_reaches_the_reward_engine_of_repair_and_the_rewards_stay(monkeypatch):
    m = _model(1)
    x, y = _pixels(60, seed=4)
    x = normalize(x, MEAN, STD)
    onp = ONPConfig(iterations=2, samples=8)
    cfg = dict(reward_batch=48, seed=3, purify="none")
    seen = _chunks_seen(monkeypatch)
    big = repair(m, x, y, NUM_CLASSES, "onp", RepairConfig(**cfg, max_memory="2GB"), onp, progress=False)
    assert [(k, n) for k, n, _ in seen[:2]] == [(8, 48), (8, 48)]  # the policy's two iterations: 8 masks, 48 images
    assert all(c == k for k, _, c in seen)  # 2GB (about 1GB of it for activations) holds every call's masks at once
    # a budget that holds the policy's 8 masks about two at a time (the engine's own estimate) and every training
    # batch (unlearning: the 48 images of D_opt)
    probe = RewardEngine(m, GroupPoints(find_groups(m, (1, 8, 8))), strategy="batched")
    shared, per_mask = probe.memory_per_mask(x[:48])
    budget = max(shared + 2 * per_mask, 48 * activation_bytes(m, x))
    assert budget < shared + 8 * per_mask, "the test needs a budget under the policy's 8 masks"
    seen.clear()
    whole = reserved_bytes(m) + int(budget)  # the process's budget: the weights' and runtime's share, then that
    small = repair(m, x, y, NUM_CLASSES, "onp", RepairConfig(**cfg, max_memory=whole), onp, progress=False)
    assert all(c < 8 for _, _, c in seen[:2]), seen  # several chunks per policy call
    assert small.report["peak_memory"]["max_memory_bytes"] == whole
    assert small.report["config"]["reserved_memory"] == reserved_bytes(m)
    assert torch.equal(big.prune, small.prune) and torch.equal(big.scores, small.scores)
    assert big.report["details"]["reward_curve"] == small.report["details"]["reward_curve"]
    assert big.report["stopping_rule"]["table"] == small.report["stopping_rule"]["table"]


def test_the_cli_budget_reaches_the_reward_engine(files, tmp_path, monkeypatch):
    """--max-memory on `onp-fast repair` is the engine's budget (before issue 18 repair never passed it on)."""
    seen = _chunks_seen(monkeypatch)
    budget = []
    real_init = engine_mod.RewardEngine.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        budget.append(self.max_memory)

    monkeypatch.setattr(engine_mod.RewardEngine, "__init__", init)
    res = _run(["repair", files["model"], "--dataset", files["data"], "--out", tmp_path / "o.pt", "--defense-size",
                "60", *ONP_FAST, "--max-memory", str(reserved_bytes(files["module"]) + 3 * 10**6)])
    assert res.exit_code == 0, res.output
    assert budget and set(budget) == {3 * 10**6}  # what the weights and the runtime leave to activations
    assert any(c < k for k, _, c in seen), seen  # 3MB splits the policy's masks on this model


def _micro_sizes(monkeypatch) -> list:
    """Records (images of the step, images per micro-batch) of every fine-tuning (finetune_pruned) run."""
    import onp_fast.prepare.finetune as finetune_mod

    seen = []
    real = finetune_mod.micro_batch

    def spy(model, sample, batch, *a, **k):
        seen.append((batch, real(model, sample, batch, *a, **k)))
        return seen[-1][1]

    monkeypatch.setattr(finetune_mod, "micro_batch", spy)
    return seen


def test_a_training_batch_the_budget_cannot_hold_is_split_into_micro_batches(files, tmp_path, monkeypatch):
    """The command that stopped before any work while training batches were never split (1MB: unlearning's 48
    images need about 2.8 MiB) now runs: unlearning and purification (sam+proxy: 48 images and their 48
    proxy-stamped copies) take their steps in micro-batches of the images the budget holds."""
    per_image = activation_bytes(files["module"], normalize(files["test"][0], MEAN, STD))
    fits = 10**6 // per_image
    assert 2 <= fits < 48, "the test needs a budget between 2 images and unlearning's 48"
    seen = _micro_sizes(monkeypatch)
    res = _run(["repair", files["model"], "--dataset", files["data"], "--out", tmp_path / "o.pt", "--defense-size",
                "60", "--iterations", "2", "--samples", "4", "--purify", "sam+proxy", "--purify-epochs", "1", "--quiet",
                "--skip-accuracy-check", "--max-memory", str(reserved_bytes(files["module"]) + 10**6)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["unlearn"]["micro_batch"] == fits and report["unlearn"]["steps"] > 0
    assert report["purify"]["mode"] == "sam+proxy" and report["purify"]["epochs"] == 1
    assert seen == [(96, fits)], seen  # purification's one run: 48 images and their copies, split
    assert report["peak_memory"]["max_memory_bytes"] == reserved_bytes(files["module"]) + 10**6


def test_unlearning_in_micro_batches_gives_the_same_unlearned_model():
    """prepare's unlearning (BatchNorm frozen) under a budget of 7 of its 48 images: the same steps and the same
    weights up to float rounding as without a budget."""
    m = _model(1)
    x, y = _pixels(60, seed=4)
    x = normalize(x, MEAN, STD)
    cfg = dict(reward_batch=48, seed=3, purify="none", weights=RewardWeights(ca_t=0.0))  # no proxies to make
    whole = prepare(m, x, y, NUM_CLASSES, RepairConfig(**cfg), progress=False)
    budget = reserved_bytes(m) + 7 * activation_bytes(m, x)
    split = prepare(m, x, y, NUM_CLASSES, RepairConfig(**cfg, max_memory=budget), progress=False)
    assert whole.unlearn_info["micro_batch"] == 48 and split.unlearn_info["micro_batch"] == 7
    info = {k: v for k, v in whole.unlearn_info.items() if k != "micro_batch"}
    assert info == {k: v for k, v in split.unlearn_info.items() if k != "micro_batch"} and info["steps"] > 0
    for p, q, r in zip(whole.unlearned.parameters(), split.unlearned.parameters(), m.parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(p, r, atol=1e-4) for p, r in zip(whole.unlearned.parameters(), m.parameters()))


def test_a_budget_under_the_smallest_micro_batch_is_an_error_before_any_work(files, tmp_path, monkeypatch):
    """Not even one image of unlearning (BatchNorm frozen), or two of purification (BatchNorm in training mode
    normalises over them), fits: one line naming the phase, the micro-batch and the budget it needs, before
    anything is prepared or written."""
    import onp_fast.repair.pipeline as pipeline

    per_image = activation_bytes(files["module"], normalize(files["test"][0], MEAN, STD))
    keep = reserved_bytes(files["module"])
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("prepare ran"))
    line = one_line_error(_run(["repair", files["model"], "--dataset", files["data"], "--out", tmp_path / "o.pt",
                                "--defense-size", "60", *ONP_FAST, "--max-memory", str(keep + per_image - 1)]),
                          "too small for unlearning", "micro-batch of 1 image", "of a step's 48", "needs about")
    assert "--max-memory" in line
    sam = [a if a != "none" else "sam" for a in ONP_FAST]  # --purify sam
    one_line_error(_run(["repair", files["model"], "--dataset", files["data"], "--out", tmp_path / "o.pt",
                         "--defense-size", "60", *sam, "--max-memory", str(keep + 2 * per_image - 1)]),
                   "too small for purification (sam)", "micro-batch of 2 images", "of a step's 48", "needs about")
    assert list(tmp_path.iterdir()) == []


# (d) evaluation: batches split to the budget, the same numbers

def test_evaluate_splits_its_batches_to_the_budget_and_gives_the_same_numbers(files, monkeypatch):
    import onp_fast.train as train_mod

    sizes = []
    real = train_mod.fit_batch

    def spy(*a, **k):
        sizes.append(real(*a, **k))
        return sizes[-1]

    monkeypatch.setattr(train_mod, "fit_batch", spy)
    per_image = activation_bytes(files["module"], files["test"][0])
    args = ["evaluate", files["model"], "--dataset", files["data"], "--attack-spec", files["spec"], "--json"]
    big = _run(args)
    assert big.exit_code == 0, big.output
    assert sizes == [512, 512]  # clean and triggered images, each in one batch
    sizes.clear()
    small = _run([*args, "--max-memory", str(3 * per_image)])
    assert small.exit_code == 0, small.output
    assert sizes == [3, 3]  # three images at a time
    assert json.loads(big.output) == json.loads(small.output)
    r = json.loads(small.output)
    assert r["ca"] > 0.5 and r["n_test"] == 80  # a model that learnt something: the numbers say something
    one_line_error(_run([*args, "--max-memory", str(per_image // 2)]), "one image's activations need about")


def test_accuracy_of_and_fit_batch_split_to_the_budget_with_the_same_result(files):
    m = files["module"]
    x, y = files["test"]
    x = normalize(x, MEAN, STD)
    per_image = activation_bytes(m, x)
    assert fit_batch(m, x, None, 256) == 256 and fit_batch(m, x, "1GB", 256) == 256
    assert fit_batch(m, x, 5 * per_image, 256) == 5
    assert accuracy_of(m, x, y) == accuracy_of(m, x, y, max_memory=5 * per_image) > 0.5
    with pytest.raises(UserError, match="one image's activations"):
        accuracy_of(m, x, y, max_memory=per_image - 1)


def test_the_activation_estimate_scales_with_the_batch_and_sees_inside_torchscript(files):
    m = files["module"]
    x = normalize(files["test"][0], MEAN, STD)
    eager = activation_bytes(m, x[:1])
    assert eager == activation_bytes(m, x[:2]) > 0  # per image, whatever the probe's batch
    traced = torch.jit.trace(m, x[:1])
    assert activation_bytes(traced, x) == pytest.approx(eager, rel=0.2)  # its ops seen through the dispatcher
    assert parse_memory("2KiB") == 2048 and m.training is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (never run on the CPU-only machine)")
def test_repair_on_cuda_returns_cpu_results_and_reports_cuda_memory():
    m = _model(1)
    x, y = _pixels(40, seed=4)
    r = repair(m, normalize(x, MEAN, STD), y, NUM_CLASSES, "onp",
               RepairConfig(reward_batch=16, seed=3, purify="sam+proxy", purify_epochs=1, device="cuda"),
               ONPConfig(iterations=2, samples=4), progress=False)
    assert r.prune.device.type == r.scores.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in r.model.parameters())
    assert r.report["peak_memory"]["cuda_max_allocated_bytes"] > 0


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (each storage once), gradients included."""
    seen, total = set(), 0
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    tensors += [t.grad for t in tensors if t.is_leaf and t.grad is not None]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.mark.parametrize("hand_over", [True, False])
def test_a_repair_holds_at_most_the_weight_copies_its_budget_keeps_room_for(monkeypatch, hand_over):
    """The live tensors after every backward of a repair (the peaks: gradients complete, a sharpness-aware step's
    ascent kept), counted in copies of the weights on a model whose weights outweigh everything else. Handed over
    (copy_model False, what `onp-fast repair` does), purification with SAM holds 6: the frozen model, the pruned
    one, the state it keeps, the momentum, the gradient and the ascent step; RepairConfig.weight_copies
    (MODEL_COPIES) keeps one more. Copied, the caller's model is a seventh."""
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=NUM_CLASSES, in_channels=1, width=0.5, input_size=8).eval()
    weights = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    x, y = _pixels(40, seed=5)
    x = normalize(x, MEAN, STD)
    peaks: dict[str, float] = {}
    phase = ["before"]
    import onp_fast.prepare.context as context_mod

    real_enter, real_backward = context_mod.Phase.__enter__, torch.autograd.backward

    def enter(self):
        phase[0] = self.name
        return real_enter(self)

    gc.collect()
    base = _live_tensor_bytes() - weights  # the caller's data; its model is counted as a copy

    def backward(*a, **k):
        out = real_backward(*a, **k)
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), (_live_tensor_bytes() - base) / weights)
        return out

    monkeypatch.setattr(context_mod.Phase, "__enter__", enter)
    monkeypatch.setattr(torch.autograd, "backward", backward)
    cfg = RepairConfig(seed=0, purify="sam+proxy", purify_epochs=2, trigger_steps=1, trigger_batch=2)  # one step
    # an epoch: the second one's with momentum
    repair(m, x, y, NUM_CLASSES, "onp", cfg, ONPConfig(iterations=1, samples=2), progress=False,
           copy_model=not hand_over)
    held = 6 if hand_over else 7
    assert held - 0.5 < peaks["purify"] < held + 0.2, peaks  # measured, and no copy more
    assert peaks["policy"] < held - 3, peaks  # the frozen model and the unlearned one (without its gradients)
    assert max(peaks.values()) == peaks["purify"], peaks
    assert RepairConfig().weight_copies == MODEL_COPIES >= 6 + 1
