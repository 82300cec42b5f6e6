"""``e4t export``: a concept as files the usual tools load, a fixed embedding plus a LoRA.

Two layouts, both written into the ``--out`` folder:

``diffusers``  ``learned_embeds.safetensors`` (``{token: [1, dim]}``, read by
               ``load_textual_inversion``), ``pytorch_lora_weights.safetensors``
               (peft keys, read by ``load_lora_weights``), for a concept with
               bias changes ``bias_changes.safetensors`` (additive changes keyed
               by the UNet's parameter names) and a README.
``kohya``      ``TOKEN.safetensors`` (``emb_params``, the embedding AUTOMATIC1111,
               Forge and ComfyUI load; its file name is the word to type) and
               ``TOKEN-lora.safetensors`` (kohya's ``lora_unet_*`` keys).

What is lost: the encoder (see ``embedding``), whatever of the weight change
(the offsets' and the additive changes') a LoRA of the chosen rank cannot hold (see ``lora``; the share kept is
reported and recorded in the files), and in the kohya layout the bias changes,
which no LoRA loader of AUTOMATIC1111 reads.
"""

import json
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from e4tcli import __version__
from e4tcli.errors import UsageError
from e4tcli.export.embedding import EmbeddingSettings
from e4tcli.models.family import SDXL

FORMATS = ("diffusers", "kohya")
DEFAULT_RANK = 16
"""On minifaces a rank-16 LoRA keeps within 0.01 of a full-rank one's identity margin (docs/minifaces.md)."""
FORMAT = "e4t-export"
"""The ``format`` entry of an exported file's safetensors metadata (``e4t concept info`` reads it)."""


@dataclass
class ExportOptions:
    concept: str
    format: str
    out: str
    rank: int = DEFAULT_RANK
    """LoRA rank per layer (0: full rank, the weight change exactly)."""
    token: Optional[str] = None
    """The word to type (default: from the concept's file name)."""
    base_model: Optional[str] = None
    device: Optional[str] = None
    precision: str = "auto"
    force: bool = False
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)


@dataclass
class ExportResult:
    files: list[Path]
    token: str
    rank: int
    energy_kept: float
    """The share of the weight change (the offsets' and the additive changes'; squared Frobenius norm, all
    layers) the LoRA holds."""
    seconds: float
    bias_changes_left_out: int = 0
    """Values of the concept's bias changes (tuned or pre-trained) left out: the kohya layout has no place for them."""


BIAS_CHANGES_FILE = "bias_changes.safetensors"


def export_file_names(format: str, token: str, bias_changes: bool = False) -> dict[str, str]:
    """What each export writes into ``--out``, by role (``bias_changes``: the concept has them)."""
    if format == "diffusers":
        names = {"embedding": "learned_embeds.safetensors", "lora": "pytorch_lora_weights.safetensors"}
        if bias_changes:
            names["biases"] = BIAS_CHANGES_FILE
        return names | {"readme": "README.md"}
    return {"embedding": f"{token}.safetensors", "lora": f"{token}-lora.safetensors"}


def bias_change_tensors(model) -> dict:
    """The concept's bias changes keyed by the plain UNet's parameter names: adding each to that parameter
    draws what e4t's hooks draw (``tests/test_bias_offsets.py``). Empty when the concept has none."""
    from e4tcli.models.bias_offsets import stored_changes

    return {} if model.biases is None else stored_changes(model.biases.state()) or {}


def default_token(concept_path: Path, vocabulary: set[str]) -> str:
    """The concept's file name as a word, made distinct from the base model's own words."""
    token = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(concept_path).stem).strip("-_") or "concept"
    if token.lower() in vocabulary or f"{token.lower()}</w>" in vocabulary:
        token += "-e4t"
    return token


def check_token(token: str, vocabulary: set[str]) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_<>-]+", token):
        raise UsageError(
            f"--token '{token}' has characters a file name or a prompt cannot hold",
            hint="use letters, digits, '-', '_' (and <> for diffusers)",
        )
    if token.lower() in vocabulary:
        raise UsageError(
            f"--token '{token}' is already a word of the base model", hint="choose a word it does not know"
        )


def export(options: ExportOptions) -> ExportResult:
    from e4tcli.api import load_concept_model
    from e4tcli.device import choose_placement
    from e4tcli.export.embedding import fixed_embedding
    from e4tcli.export.lora import FULL_RANK, energy_kept, factor_offsets, kohya_tensors, peft_tensors
    from e4tcli.io.atomic import atomic_file
    from e4tcli.io.concept import read_concept_info, stored_tensors
    from e4tcli.io.destinations import check_new_file, check_output_folder

    start = time.perf_counter()
    if options.format not in FORMATS:
        raise UsageError(f"unknown export format '{options.format}'", hint=f"use one of: {', '.join(FORMATS)}")
    if options.rank < 0:
        raise UsageError("--rank must be 0 (full) or more")
    info = read_concept_info(Path(options.concept))
    out = Path(options.out)
    check_output_folder(out)
    placement = choose_placement(options.device, options.precision)
    model, concept = load_concept_model(options.concept, options.base_model, placement)
    vocabulary = set(model.tokenizer.get_vocab())
    token = options.token or default_token(Path(options.concept), vocabulary)
    check_token(token, vocabulary)
    changes = bias_change_tensors(model)
    names = export_file_names(options.format, token, bool(changes))
    stale_changes = options.format == "diffusers" and not changes  # another concept's, from an earlier export
    for name in [*names.values(), *([BIAS_CHANGES_FILE] if stale_changes else [])]:
        check_new_file(out / name, options.force)

    embedding = fixed_embedding(model, info["tuning"]["resolution"], options.embedding)
    factored = factor_offsets(model, options.rank)
    kept = energy_kept(factored)
    rank = max(layer.rank for layer in factored.values())
    record = {
        "format": options.format,
        "token": token,
        "rank": "full" if options.rank == FULL_RANK else rank,
        "energy_kept": round(kept, 6),
        "embedding": asdict(options.embedding),
        "concept": {
            key: info[key] for key in ("domain", "class_word", "base_model", "checkpoint", "offsets") if key in info
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "e4t_version": __version__,
    }
    parts = model.split_concept(embedding.reshape(1, -1).float())
    if options.format == "diffusers":
        contents = {"embedding": model.family.embedding_file(parts, token), "lora": peft_tensors(factored)}
    else:
        contents = {"embedding": model.family.embedding_file(parts, "emb_params"), "lora": kohya_tensors(factored)}
    contents["lora"] = stored_tensors(contents["lora"], "fp16")
    if "biases" in names:
        contents["biases"] = stored_tensors(changes, "fp16")
    with ExitStack() as stack:
        temporary = {role: stack.enter_context(atomic_file(out / name)) for role, name in names.items()}
        for role in (role for role in names if role != "readme"):
            metadata = {"format": FORMAT, "e4t": json.dumps(record | {"kind": role}, sort_keys=True)}
            save_safetensors(contents[role], temporary[role], metadata)
        if "readme" in temporary:
            temporary["readme"].write_text(diffusers_readme(token, info, names, model.family))
    if stale_changes:
        (out / BIAS_CHANGES_FILE).unlink(missing_ok=True)
    left_out = 0 if "biases" in names else sum(value.numel() for value in changes.values())
    return ExportResult(
        [out / name for name in names.values()], token, rank, kept, time.perf_counter() - start, left_out
    )


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def diffusers_readme(token: str, info: dict, names: dict[str, str], family) -> str:
    base = info["base_model"]["source"]
    shown = (
        base if not base.startswith("domain:") else "<the base model of domain " + base.removeprefix("domain:") + ">"
    )
    embedding = names["embedding"]
    if family.name == SDXL:
        load_embedding = (
            f'embedding = load_file("{embedding}")\n'
            f'pipe.load_textual_inversion(embedding["clip_l"], token="{token}", '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)\n"
            f'pipe.load_textual_inversion(embedding["clip_g"], token="{token}", '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
        )
        imports = f"from diffusers import {family.pipeline_class}\nfrom safetensors.torch import load_file"
    else:
        load_embedding = f'pipe.load_textual_inversion("{embedding}", token="{token}")'
        imports = f"from diffusers import {family.pipeline_class}"
    if "biases" in names:
        if "safetensors" not in imports:
            imports += "\nfrom safetensors.torch import load_file"
        load_embedding += (
            f'\nfor name, change in load_file("{names["biases"]}").items():  # before the LoRA, which renames layers\n'
            "    parameter = pipe.unet.get_parameter(name)\n"
            "    parameter.data += change.to(parameter.device, parameter.dtype)"
        )
    return f"""# {token}: an e4t concept for diffusers

Exported by `e4t export --format diffusers` from a concept of domain `{info["domain"]}`.
Base model: `{shown}` ({family.label}, fingerprint {info["base_model"]["fingerprint"]}).

```python
{imports}

pipe = {family.pipeline_class}.from_pretrained("{shown}")
{load_embedding}
pipe.load_lora_weights(".", weight_name="{names["lora"]}")
image = pipe("a photo of {token} as an astronaut").images[0]
```

Run it in this folder (or give the paths). `{token}` stands where e4t's prompts say `S*`.
"""
