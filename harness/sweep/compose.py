"""What the sweep planner needs from a run config without training it: the config itself, composed
cheaply for many similar runs, and the network's FLOPs and parameter count."""
from __future__ import annotations

import copy
import json
from functools import lru_cache

from harness.config import ConfigError

TRAIN_FLOPS_PER_FORWARD = 3.0   # forward + backward ~ 3 forwards (the usual 6N-per-token convention)
# Per-sample shape and class count of each dataset (for FLOP counting without loading the data).
DATA_SHAPES = {"digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "imagenet64": ((3, 64, 64), 1000)}


def compose_cached(overrides: list[str], cache: dict):
    """compose(overrides), composed by Hydra once per shape: runs that set the same keys with the same
    group choices (method=, model=, data=, preset=, recipe=) share one composition, each run's
    values are then set on a copy and checked by harness.config.validate (what compose itself does)."""
    from omegaconf import OmegaConf

    from harness.config import GROUPS, parse_overrides, compose, validate
    parsed = parse_overrides(list(overrides))
    fixed = GROUPS
    key = (tuple(o.input_line for o in parsed if o.key_or_group in fixed), tuple(o.key_or_group for o in parsed))
    if key not in cache:
        cache[key] = compose(overrides)
        return cache[key]
    cfg = copy.deepcopy(cache[key])
    try:
        for o in parsed:
            if o.key_or_group not in fixed:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
    except Exception as exc:   # type errors from OmegaConf, on one line (as compose reports them)
        raise ConfigError(f"invalid override: {' '.join(str(exc).split())}") from None
    validate(cfg)
    return cfg


@lru_cache(maxsize=None)
def forward_flops(model_json: str, data_name: str, class_conditional: bool) -> tuple[float, int]:
    """(forward FLOPs per sample, parameter count) of a network config, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.nets import build_net, count_params
    if data_name in DATA_SHAPES:
        shape, classes = DATA_SHAPES[data_name]
    else:
        shape, classes = (2,), 0                      # the 2-D toys
    classes = classes if class_conditional else 0
    model = json.loads(model_json)
    with torch.device("meta"):
        net = build_net(model, shape, classes).eval()
        labels = torch.zeros(1, dtype=torch.long) if classes else None
        extra = torch.zeros(1, model["extra_cond_dim"]) if model.get("extra_cond_dim") else None
        with FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, *shape), torch.ones(1), labels, extra)
    return float(counter.get_total_flops()), int(count_params(net))


def flops_of(cfg) -> tuple[float, int]:
    from omegaconf import OmegaConf
    model = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    return forward_flops(model, str(cfg.data.name), bool(cfg.data.class_conditional))
