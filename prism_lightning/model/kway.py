"""K-way routing settings: which personas each adapter holds (``model.adapters``), checked early."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from prism_lightning.errors import ConfigError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_adapter_groups(adapters: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]] | None:
    """``{adapter name: [persona, ...]}`` as a plain dict, or None (the single adapter). Refuses fewer
    than two groups (one group is the single adapter), names peft cannot keep apart, empty groups and
    a persona in two groups."""
    if adapters is None:
        return None
    if not isinstance(adapters, Mapping):
        raise ConfigError(f"model.adapters must map adapter names to persona lists, got {adapters!r}.")
    groups = {str(k): [v] if isinstance(v, str) else [str(p) for p in v] for k, v in adapters.items()}
    if len(groups) < 2:
        raise ConfigError(
            f"model.adapters needs at least 2 adapters for K-way routing, got {len(groups)}; "
            "for one adapter leave model.adapters null."
        )
    seen: dict[str, str] = {}
    for name, personas in groups.items():
        # peft names parameters lora_A.<name>.weight: a name inside "lora_" or "default" would collide
        if not _NAME.fullmatch(name) or name in "lora_" or name == "default":
            raise ConfigError(
                f"model.adapters: adapter name {name!r} is not usable; use letters, digits, _ or - "
                "(starting with a letter), not 'default' and not a part of 'lora_'."
            )
        if not personas:
            raise ConfigError(f"model.adapters.{name} holds no persona; list at least one.")
        for persona in personas:
            if persona in seen:
                raise ConfigError(
                    f"model.adapters: persona {persona!r} is in both {seen[persona]!r} and {name!r}; "
                    "each persona goes to one adapter."
                )
            seen[persona] = name
    return groups


def persona_routes(groups: Mapping[str, Sequence[str]], persona_names: Sequence[str]) -> torch.Tensor:
    """(P,) route per persona index of the bootstrap (adapter j = route j, in ``groups`` order). Every
    bootstrap persona must be in a group and every grouped persona in the bootstrap."""
    route_of = {p: j for j, personas in enumerate(groups.values(), 1) for p in personas}
    missing = [p for p in persona_names if p not in route_of]
    unknown = [p for p in route_of if p not in persona_names]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"bootstrap persona(s) {missing} are in no adapter")
        if unknown:
            parts.append(f"model.adapters names persona(s) {unknown} that the bootstrap does not have")
        raise ConfigError(
            f"model.adapters does not match data.bootstrap.personas: {'; '.join(parts)} "
            f"(bootstrap personas: {', '.join(persona_names)})."
        )
    return torch.tensor([route_of[p] for p in persona_names], dtype=torch.long)
