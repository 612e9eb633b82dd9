"""The shared preparation every defense starts from (onp.md sections 1, 2 and 5): the D_opt / D_val split, the
neuron groups, the unlearned copy, the trigger proxy, the adversarial perturbations; and the tools every
defense may call on a pruned model (fine-tuning with pruned groups held at zero).

    ctx = prepare(model, x, y, num_classes, RepairConfig(seed=0))
    ctx.groups, ctx.x_opt, ctx.trigger, ctx.scorer("opt")(prune [K, G] bool) -> rewards [K]
"""
from .context import (PURIFY_EPOCHS, UNLEARN_BATCH, DefenseContext, Phase, RepairConfig, check_defense_set,
                      check_training_budget, checked_config, prepare, trigger_run, trigger_settings,
                      with_effort)
from .finetune import FINETUNE_BATCH, finetune_pruned
from .perturb import adversarial_perturbations
from .scan import scan, scan_with_proxies, summarize
from .trigger import FAMILIES, ProxySet, TriggerProxy, synthesize_proxies, synthesize_trigger
from .unlearn import accuracy_of, unlearn

__all__ = ["FAMILIES", "FINETUNE_BATCH", "PURIFY_EPOCHS", "UNLEARN_BATCH", "DefenseContext", "Phase", "ProxySet",
           "RepairConfig", "TriggerProxy", "accuracy_of", "adversarial_perturbations", "check_defense_set",
           "check_training_budget", "checked_config", "finetune_pruned", "prepare", "scan", "scan_with_proxies",
           "summarize", "synthesize_proxies", "synthesize_trigger", "trigger_run", "trigger_settings", "unlearn",
           "with_effort"]
