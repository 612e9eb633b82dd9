"""Backdoor attacks: a registry of seeded triggers acting on [0, 1] pixel images [B, C, H, W].

    attack = onp_fast.attacks.build("badnets", (3, 32, 32), seed=0)
    triggered = attack.apply(images)
    same = onp_fast.attacks.from_spec(attack.spec())   # JSON round trip
"""
from .base import Attack, PoisonedSet, build, from_spec, get, names, params_by_attack, parse_params, register
from . import badnets, blended, sig, wanet  # noqa: F401  (registers the attacks)

__all__ = ["Attack", "PoisonedSet", "build", "from_spec", "get", "names", "params_by_attack", "parse_params",
           "register"]
