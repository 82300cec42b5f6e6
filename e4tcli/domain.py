"""What a domain is: the record a plugin registers. Torch-free by design."""

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional

PLACEHOLDER = "S*"
"""The pseudo-word that stands for the personalized concept in prompts."""

FALLBACK_STEPS = 10
"""Tuning steps without a domain checkpoint (both encoder head and offsets start at zero): on minifaces,
the fewest measured steps whose identity margin came within 0.02 of the pre-trained domain's 5-step
figure when chosen (within 0.05 on the shipped models; docs/minifaces.md, "Without a domain checkpoint").
Not measured on Stable Diffusion."""


@dataclass(frozen=True)
class PhaseDefaults:
    """Default hyper-parameters of one phase (pre-training or tuning)."""

    steps: int
    learning_rate: float
    batch_size: int
    resolution: int
    lambda_emb: float
    """Weight of ``||offset||^2``, the encoder-output regulariser."""
    offset_learning_rate: Optional[float] = None
    """The weight offsets' own tuning rate (default: ``learning_rate``). In a handful of tuning steps,
    offsets at a rate that suits the encoder barely move; a higher rate lets them take part. Tuning only
    (``tune`` and ``fallback``): pre-training trains the offsets at ``learning_rate``."""
    bias_learning_rate: Optional[float] = None
    """Also train additive changes to the UNet's biases and normalization parameters at this rate (``--bias-lr``;
    None: not trained). In ``pretrain`` the domain checkpoint then holds them and tuning starts from them; in
    ``tune`` and ``fallback`` they are tuned from there, or from zero where the checkpoint has none."""
    additive_rank: int = 0
    """Also tune an additive change of this rank to every weight the offsets modulate (``--additive-rank``;
    0: none). Tuning only: each concept's are its own, from zero."""
    additive_learning_rate: Optional[float] = None
    """The additive changes' tuning rate (``--additive-lr``; default: ``learning_rate``)."""


OFFSET_KINDS = ("paper", "lowrank")
OFFSET_LAYERS = ("attention", "attention+resnets")


@dataclass(frozen=True)
class OffsetDefaults:
    """The weight offsets a domain pre-trains (``e4t pretrain --offsets/--offset-rank/--offset-layers``)."""

    kind: str = "paper"
    """"paper" (E4T's construction, rank 1 per layer) or "lowrank" (``dW = U V^T``)."""
    rank: int = 4
    """Rank of "lowrank" offsets."""
    layers: str = "attention"
    """"attention" (q, k, v of every attention layer, as in the paper) or "attention+resnets"
    (also the ResNet convolutions, for a base model whose attention carries little of a subject)."""


@dataclass(frozen=True)
class EncoderDefaults:
    """The encoder a domain pre-trains (``e4t pretrain --encoder-hidden-dim/--encoder-scale``)."""

    hidden_dim: int = 768
    """Width of the encoder's head."""
    scale: float = 0.1
    """s in ``S* = emb(class word) + s * offset``: how far a unit of the encoder's output moves the word."""


@dataclass(frozen=True)
class Domain:
    """A family of concepts (faces, cats, art styles...) e4t can personalize.

    Every callable is a *factory*: e4t calls it when it needs the object, so
    that registering a domain stays free of torch and other heavy imports.
    """

    name: str
    description: str
    class_word: str
    """A single CLIP token naming the coarse class ("face", "cat", "painting")."""
    prompt_templates: tuple[str, ...]
    """Training prompts, each containing the placeholder ``S*``. A template may name
    fields of the dataset's per-image metadata, e.g. ``"a {style} painting by S*"``:
    pre-training fills them when the dataset has ``metadata(i)``; tuning (a user's
    image has no metadata) uses only the templates without fields. ``pretrain_templates``,
    when set, replaces them in pre-training."""
    base_model: str
    """Default text-to-image model: a hub id or a local diffusers folder."""
    backbone: str
    """Default CLIP vision tower for the encoder: a hub id or a local folder."""
    pretrain: PhaseDefaults
    tune: PhaseDefaults
    lambda_weights: float
    """Weight of ``||dW||^2``, the weight-offset regulariser."""
    dataset: Callable[..., Any]
    """``dataset(path) -> sequence of RGB PIL images`` for this domain's data."""
    preprocess: Optional[Callable[[Any], Any]] = None
    """``preprocess(PIL image) -> PIL image`` applied to the user's image before tuning."""
    loss_mask: Optional[Callable[[Any], Any]] = None
    """``loss_mask(PIL image) -> PIL "L" image`` weighting the loss (e.g. the face region)."""
    offsets: OffsetDefaults = field(default_factory=OffsetDefaults)
    encoder: EncoderDefaults = field(default_factory=EncoderDefaults)
    pretrain_templates: tuple[str, ...] = ()
    """Pre-training prompts when they must differ from the tuning ones (default: ``prompt_templates``).
    Useful when the dataset's metadata names what varies between its images (say the
    background) and the user's one image always shows the same: pre-training can then
    name it with ``{fields}``, so the encoder's word need not carry it. Images without
    the fields fall back to the first of ``prompt_templates`` without fields."""
    checkpoint: Optional[str] = None
    """Where the pre-trained domain checkpoint lives: a folder shipped with the plugin, or a hub id
    (``"owner/name"``) published with ``e4t domains push``. None: ``tune`` starts from the base model."""
    checkpoint_revision: Optional[str] = None
    """For a hub id: the commit (40 hex digits) to download, so that a later push cannot change a domain."""
    checkpoint_fingerprint: Optional[str] = None
    """For a hub id: the checkpoint's content fingerprint (``fingerprint`` in its ``config.json``);
    ``e4t domains pull`` refuses a download that does not match."""
    fallback: Optional[PhaseDefaults] = None
    """Tuning defaults when there is no domain checkpoint (encoder head and offsets start at zero);
    default: ``tune`` with ``FALLBACK_STEPS`` steps."""
    extra: dict = field(default_factory=dict)
    """Free-form defaults a plugin wants to carry (shown by ``e4t domains show``)."""

    def fallback_defaults(self) -> PhaseDefaults:
        """How ``tune`` trains without a domain checkpoint: the plugin's ``fallback``, else ``tune`` for longer."""
        if self.fallback is not None:
            return self.fallback
        return replace(self.tune, steps=FALLBACK_STEPS)

    def defaults(self) -> dict:
        """Every default as plain data (for display and JSON)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (PhaseDefaults, OffsetDefaults, EncoderDefaults)):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            elif callable(value):
                value = f"{value.__module__}.{getattr(value, '__qualname__', repr(value))}"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def template_fields(template: str) -> set[str]:
    """The ``{field}`` names a prompt template uses (empty for a plain template)."""
    from string import Formatter

    return {field for _, field, _, _ in Formatter().parse(template) if field is not None}


def plain_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    """The templates that need no metadata."""
    return tuple(t for t in templates if not template_fields(t))


def fill_template(template: str, metadata: Optional[dict]) -> Optional[str]:
    """``template`` with its fields filled from ``metadata`` ("_" read as spaces); None when one is missing."""
    fields_used = template_fields(template)
    if not fields_used:
        return template
    metadata = metadata or {}
    values = {
        name: "" if metadata.get(name) is None else str(metadata[name]).replace("_", " ").strip()
        for name in fields_used
    }
    if not all(values.values()):
        return None
    return template.format(**values)


def validate_domain(domain: Any) -> list[str]:
    """Every problem that makes ``domain`` unusable; an empty list when it is fine."""
    from e4tcli.vocab import is_single_clip_token

    if not isinstance(domain, Domain):
        return [f"expected an e4tcli.Domain, got {type(domain).__name__}"]
    problems = []
    for name in ("name", "description", "class_word", "base_model", "backbone"):
        value = getattr(domain, name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"missing field '{name}'")
    if isinstance(domain.name, str) and domain.name.strip():
        if not domain.name.replace("-", "").replace("_", "").isalnum() or domain.name != domain.name.lower():
            problems.append(f"domain name '{domain.name}' must be lowercase letters, digits, '-' or '_'")
    if isinstance(domain.class_word, str) and domain.class_word.strip():
        if not is_single_clip_token(domain.class_word):
            problems.append(
                f"class word '{domain.class_word}' is not a single CLIP token; choose one word of the CLIP vocabulary"
            )
    templates = domain.prompt_templates
    if not templates or isinstance(templates, str):
        problems.append("missing field 'prompt_templates' (a tuple of prompts containing 'S*')")
    else:
        problems += template_problems(templates)
        if not any(PLACEHOLDER in t and not _has_fields(t) for t in templates if isinstance(t, str)):
            problems.append("prompt_templates needs at least one template without {fields} (used for tuning)")
    if not isinstance(domain.pretrain_templates, (tuple, list)):
        problems.append("'pretrain_templates' must be a tuple of prompts containing 'S*'")
    else:
        problems += template_problems(domain.pretrain_templates)
    for phase_name in ("pretrain", "tune", "fallback"):
        phase = getattr(domain, phase_name)
        if phase is None and phase_name == "fallback":
            continue
        if not isinstance(phase, PhaseDefaults):
            problems.append(f"missing field '{phase_name}' (a PhaseDefaults)")
            continue
        for f in fields(phase):
            value = getattr(phase, f.name)
            if value is None and f.name in ("offset_learning_rate", "bias_learning_rate", "additive_learning_rate"):
                continue
            if f.name == "additive_rank":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    problems.append(f"{phase_name}.additive_rank must be a whole number, 0 or more, got {value!r}")
                elif phase_name == "pretrain" and value:
                    problems.append("pretrain.additive_rank must be 0: the additive changes are tuned per concept")
                continue
            if not isinstance(value, (int, float)) or value < 0 or (value == 0 and f.name != "lambda_emb"):
                problems.append(f"{phase_name}.{f.name} must be a positive number, got {value!r}")
    offsets = domain.offsets
    encoder = domain.encoder
    if not isinstance(encoder, EncoderDefaults):
        problems.append("'encoder' must be an EncoderDefaults")
    else:
        if not isinstance(encoder.hidden_dim, int) or encoder.hidden_dim < 1:
            problems.append(f"encoder.hidden_dim must be a positive integer, got {encoder.hidden_dim!r}")
        if not isinstance(encoder.scale, (int, float)) or encoder.scale <= 0:
            problems.append(f"encoder.scale must be a positive number, got {encoder.scale!r}")
    if not isinstance(offsets, OffsetDefaults):
        problems.append("'offsets' must be an OffsetDefaults")
    else:
        if offsets.kind not in OFFSET_KINDS:
            problems.append(f"offsets.kind must be one of {', '.join(OFFSET_KINDS)}, got {offsets.kind!r}")
        if offsets.layers not in OFFSET_LAYERS:
            problems.append(f"offsets.layers must be one of {', '.join(OFFSET_LAYERS)}, got {offsets.layers!r}")
        if not isinstance(offsets.rank, int) or offsets.rank < 1:
            problems.append(f"offsets.rank must be a positive integer, got {offsets.rank!r}")
    if not isinstance(domain.lambda_weights, (int, float)) or domain.lambda_weights < 0:
        problems.append(f"lambda_weights must be a non-negative number, got {domain.lambda_weights!r}")
    problems += checkpoint_problems(domain)
    if not callable(domain.dataset):
        problems.append("missing field 'dataset' (a callable: path -> images)")
    for name in ("preprocess", "loss_mask"):
        if getattr(domain, name) is not None and not callable(getattr(domain, name)):
            problems.append(f"'{name}' must be callable or None")
    return problems


def checkpoint_problems(domain: Domain) -> list[str]:
    """A hub checkpoint must be pinned: a commit to download and a fingerprint to verify."""
    from os import PathLike

    from e4tcli.io.hub import HUB_ID, is_commit, is_fingerprint, names_hub_checkpoint

    source = domain.checkpoint
    if source is None:
        return []
    if not isinstance(source, (str, PathLike)) or not str(source).strip():
        return ["'checkpoint' must be a folder, a hub id or None"]
    if not names_hub_checkpoint(domain):
        return []
    problems = []
    if not HUB_ID.match(str(source)):
        problems.append(f"checkpoint '{source}' has a revision and fingerprint but is not a hub id (OWNER/NAME)")
    if not is_commit(domain.checkpoint_revision):
        problems.append(
            f"checkpoint '{source}' needs checkpoint_revision, a commit of 40 hex digits"
            f" (got {domain.checkpoint_revision!r}; a branch can move under your users)"
        )
    if not is_fingerprint(domain.checkpoint_fingerprint):
        problems.append(
            f"checkpoint '{source}' needs checkpoint_fingerprint, the 16 hex digits of its config.json's 'fingerprint'"
            f" (got {domain.checkpoint_fingerprint!r})"
        )
    return problems


def template_problems(templates) -> list[str]:
    problems = []
    for template in templates:
        if not isinstance(template, str) or PLACEHOLDER not in template:
            problems.append(f"prompt template '{template}' does not contain '{PLACEHOLDER}'")
            continue
        try:
            names = template_fields(template)
        except ValueError as error:
            problems.append(f"prompt template '{template}' has malformed {{fields}} ({error})")
            continue
        if any(not name.isidentifier() for name in names):
            problems.append(f"prompt template '{template}' may only use named fields like {{style}}")
    return problems


def _has_fields(template: str) -> bool:
    try:
        return bool(template_fields(template))
    except ValueError:
        return True
