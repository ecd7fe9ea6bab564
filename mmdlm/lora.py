"""LoRA fine-tuning of mmdlm's `Transformer` with peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

`add_lora` injects low-rank adapters into Linear layers of the transformer blocks (`peft.inject_adapter_in_model`:
each adapted layer computes W x + (alpha / rank) B A x, B starting at zero, so the adapted model starts as the
base) and freezes every base parameter except those of the modules named in `train_also` (peft's
`modules_to_save` idea, without its wrapper: the state dict keeps mmdlm's keys; e.g. `tok_emb` for new
vocabulary rows). `merge_lora` folds the adapters into the base weights and puts the plain Linear layers back,
and `merged_copy` does it on a copy, so a model folder always holds plain weights that
`MMDLMPipeline.from_pretrained` loads. `LitMDM`'s `lora_*` options use these (`configs/lora.yaml`).

    model = Transformer(config)
    model.load_state_dict(base)                     # the weights to adapt
    trained, total = add_lora(model, rank=8)        # only the adapters train
    print(lora_report(model))                       # LoRA rank 8 on attn.qkv, ...: training N of M parameters (x%)
    plain = merged_copy(model)                      # the adapted model as a plain Transformer
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from mmdlm.errors import UserError
from mmdlm.model import Transformer

# the Linear layers of every block: attention's qkv and output projections, the SwiGLU MLP's two matmuls
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
ADAPTER = "default"  # peft's adapter name: one adapter per model


def _matches(model: torch.nn.Module, name: str) -> list[str]:
    """The names of `model`'s modules that `name` selects: the module of that name or any whose name ends in
    `.name` (peft's rule for a list of target modules)."""
    return [key for key, _ in model.named_modules() if key == name or key.endswith(f".{name}")]


def _check_targets(model: Transformer, targets: Sequence[str]) -> None:
    """`UserError` unless each target selects at least one Linear layer of the blocks and nothing else."""
    if not targets:
        raise UserError(f"LoRA needs at least one target layer, such as {', '.join(DEFAULT_TARGETS)}")
    blocks = {f"blocks.{key}" for key, module in model.blocks.named_modules() if isinstance(module, torch.nn.Linear)}
    for target in targets:
        found = _matches(model, target)
        if not found:
            raise UserError(f"LoRA target {target!r} matches no layer of the transformer (the blocks' Linear "
                            f"layers are {', '.join(DEFAULT_TARGETS)})")
        # lm_head and code_proj are read as weight tables (F.linear on `.weight`, cached between sampling
        # calls), never called: an adapter there would never run
        outside = [key for key in found if key not in blocks]
        if outside:
            raise UserError(f"LoRA target {target!r} selects {outside[0]!r}, which is not a Linear layer of the "
                            f"blocks (adapters go on {', '.join(DEFAULT_TARGETS)}); train it fully with "
                            f"train_also (--model.lora_train) instead")


def add_lora(model: Transformer, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS,
             dropout: float = 0.0, train_also: Sequence[str] = ()) -> tuple[int, int]:
    """Inject LoRA adapters of `rank` into the block Linear layers named by `targets` (module-name suffixes,
    e.g. `attn.qkv`, or `blocks.0.mlp.fc` for one layer), in place, and freeze every other parameter except
    those of the modules named in `train_also` (e.g. `tok_emb`, `lm_head`: trained fully beside the adapters).

    Call it after loading the weights to adapt: a state dict of the adapted model holds peft's keys
    (`blocks.0.attn.qkv.base_layer.weight`, `....lora_A.default.weight`). Returns (trained, total) parameter
    counts. `UserError` for a rank below 1, a dropout outside [0, 1), or a name that matches no fitting module.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"the LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"the LoRA dropout must be in [0, 1), got {dropout}")
    if alpha <= 0:
        raise UserError(f"the LoRA alpha (the adapters' scale is alpha / rank) must be positive, got {alpha}")
    if has_lora(model):
        raise UserError("this model already has LoRA adapters (merge them with merge_lora first)")
    _check_targets(model, targets)
    trained_fully = {name: _matches(model, name) for name in train_also}
    for name, found in trained_fully.items():
        if not found:
            raise UserError(f"train_also (--model.lora_train) {name!r} matches no module of the transformer "
                            f"(such as tok_emb, lm_head or norm)")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # freezes everything but the adapters
    for found in trained_fully.values():
        for key in found:
            model.get_submodule(key).requires_grad_(True)
    return parameter_counts(model)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trained, total): the parameters that require grad, and all of them (adapters included)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters())


def has_lora(model: torch.nn.Module) -> bool:
    """Whether `model` holds LoRA adapters (`add_lora` and not yet `merge_lora`)."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_report(model: Transformer) -> str:
    """One line: the adapters' rank and targets, and how many parameters train, e.g.
    "LoRA rank 8 on attn.qkv, attn.proj, mlp.fc, mlp.proj: training 40,960 of 1,246,720 parameters (3.29%)"."""
    config = model.peft_config[ADAPTER]
    targets = ", ".join(sorted(config.target_modules))
    trained, total = parameter_counts(model)
    return (f"LoRA rank {config.r} on {targets}: training {trained:,} of {total:,} parameters "
            f"({100 * trained / total:.2f}%)")


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold each adapter into its base Linear weight (W + (alpha / rank) B A, peft's `merge`) and put the base
    layer back in the adapter layer's place, in place: the state dict has mmdlm's plain keys again and every
    parameter trains (a plain `Transformer`). Returns `model`."""
    layers = [(key, module) for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for key, layer in layers:
        layer.merge(safe_merge=True)  # safe: a non-finite merged weight raises instead of being written
        parent, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(True)
    return model


def merged_copy(model: Transformer) -> Transformer:
    """A plain `Transformer` on the CPU whose weights are `model`'s with the adapters merged in (in fp32, then
    cast to `model`'s dtype); `model` keeps its adapters. Rebuilt from the config and loaded rather than
    `copy.deepcopy`d, which would copy the compiled wrappers of `compile_for_training` too."""
    clone = Transformer(model.config)
    inject_adapter_in_model(copy.deepcopy(model.peft_config[ADAPTER]), clone, adapter_name=ADAPTER)
    clone.load_state_dict(model.state_dict())  # copied into the clone's fp32 CPU tensors
    return merge_lora(clone).to(next(model.parameters()).dtype)
