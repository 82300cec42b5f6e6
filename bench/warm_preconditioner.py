"""A lever of ``minifaces_quality.py``: E4T's tuning optimizer starts from the domain's gradient statistics.

AdamW's first steps move every parameter by about its rate, whatever the size
of its gradient (the first update is ``g / |g|``), so in five steps a
parameter that only carries noise moves as far as one that carries the
reference. Here the second moments start from the mean squared gradient of
the same tuning on training identities, measured once: a parameter moves by
its rate times how large its gradient is for this reference against how large
it usually is. The first moment keeps Adam's bias correction; the second does
not need one.
"""

import random

import torch


class WarmAdam(torch.optim.Optimizer):
    """Adam whose second moment starts at ``second_moments[id(parameter)]`` (Adam's own where missing)."""

    def __init__(self, param_groups, second_moments: dict[int, torch.Tensor]):
        super().__init__(param_groups, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8})
        self.second_moments = second_moments

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient, state = parameter.grad, self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(parameter)
                    warm = self.second_moments.get(id(parameter))
                    state["warm"] = warm is not None
                    state["v"] = warm.clone().to(parameter) if warm is not None else torch.zeros_like(parameter)
                state["step"] += 1
                if group["weight_decay"]:
                    parameter.mul_(1 - group["lr"] * group["weight_decay"])
                state["m"].mul_(beta1).add_(gradient, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
                first = state["m"] / (1 - beta1 ** state["step"])
                second = state["v"] if state["warm"] else state["v"] / (1 - beta2 ** state["step"])
                parameter.addcdiv_(first, second.sqrt().add_(group["eps"]), value=-group["lr"])


def tuned_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Everything tuning trains, by name: encoder, offsets, bias changes and additive changes."""
    named = dict(model.named_trainable_parameters())
    for name, layer in model.offsets.items():
        if layer.additive is not None:
            named.update({f"additive.{name}.{k}": v for k, v in layer.additive.named_parameters()})
    return named


def domain_second_moments(w, identities: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """Mean squared gradient of each tuned parameter over the default tuning (``e4t tune``'s steps, rates,
    loss mask, bias and additive changes) of ``identities`` training identities' portraits."""
    from diffusers import DDPMScheduler
    from e4t_minifaces import minifaces_domain, world
    from e4t_minifaces.evaluate import default_tuning

    from e4tcli.models.loading import backbone_features
    from e4tcli.training.tune import tune_concept

    domain = minifaces_domain()
    rng = random.Random(seed)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for index in range(identities):
        model = w.e4t_model()
        identity = world.random_identity(rng)
        reference = world.portrait(identity)
        features = backbone_features(w.backbone, [reference], model.encoder_config.backbone_layers)

        def record(step, losses):
            for name, parameter in tuned_parameters(model).items():
                if parameter.grad is not None:
                    sums[name] = sums.get(name, 0) + parameter.grad.detach().float() ** 2
                    counts[name] = counts.get(name, 0) + 1

        settings = default_tuning(seed=index + 1)
        scheduler = DDPMScheduler.from_config(model.base.scheduler_config)
        tune_concept(
            model,
            reference,
            features,
            domain.prompt_templates,
            settings,
            scheduler,
            domain.loss_mask(reference),
            record,
        )
        model.remove_bias_offsets()
        model.remove_additive_changes()
    means = {name: total / counts[name] for name, total in sums.items()}
    return {name: mean.clamp(min=1e-3 * float(mean.mean()) + 1e-30) for name, mean in means.items()}


def precondition_tuning(w, identities: int) -> None:
    """From now on E4T's tuning uses ``WarmAdam`` with the domain's second moments (the same groups and rates
    as ``e4t tune``'s AdamW)."""
    import e4tcli.training.tune as tune

    moments = domain_second_moments(w, identities)
    optimizer_for = tune.optimizer_for

    def warm(model, *args, **kwargs):
        adam = optimizer_for(model, *args, **kwargs)
        by_id = {id(p): moments[name] for name, p in tuned_parameters(model).items() if name in moments}
        return WarmAdam(adam.param_groups, by_id)

    tune.optimizer_for = warm
