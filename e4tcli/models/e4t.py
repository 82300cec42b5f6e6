"""An E4T model: a base Stable Diffusion model with the encoder and weight offsets attached."""

from contextlib import ExitStack
from dataclasses import asdict
from typing import Optional

import torch

from e4tcli.device import Placement
from e4tcli.domain import PLACEHOLDER
from e4tcli.errors import UsageError
from e4tcli.models.additive_changes import PREFIX as ADDITIVE_PREFIX
from e4tcli.models.additive_changes import AdditiveChange, stored_additive_changes
from e4tcli.models.bias_offsets import PREFIX as BIAS_PREFIX
from e4tcli.models.bias_offsets import BiasOffsets, stored_changes
from e4tcli.models.encoder import ConceptEncoder, E4TEncoder, EncoderConfig
from e4tcli.models.loading import BaseModel
from e4tcli.models.placeholder import PlaceholderEmbedding
from e4tcli.models.weight_offsets import (
    OffsetConfig,
    add_weight_offsets,
    offset_parameters,
    offsets_squared_norm,
)


class _StopAfterMidBlock(Exception):
    pass


def unet_channels(unet) -> tuple[int, ...]:
    """Channels of each pooled UNet feature the encoder reads: every down block, then the mid block."""
    channels = tuple(unet.config.block_out_channels)
    return channels + (channels[-1],)


def _factors_by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    columns = {
        k.removeprefix("offsets.").removesuffix(".column"): v for k, v in tensors.items() if k.endswith(".column")
    }
    rows = {k.removeprefix("offsets.").removesuffix(".row"): v for k, v in tensors.items() if k.endswith(".row")}
    return {name: (columns[name].float(), rows[name].float()) for name in columns if name in rows}


def concept_encoder(config: EncoderConfig, tensors: dict[str, torch.Tensor]) -> ConceptEncoder:
    """The encoder of a concept file: stored folded (format version 2), or stored whole with the
    reference's ``image_features`` (version 1) and folded here."""
    state = {k.removeprefix("encoder."): v.float() for k, v in tensors.items() if k.startswith("encoder.")}
    if "reference" in state:
        folded = ConceptEncoder(config)
        folded.load_state_dict(state)
        return folded
    whole = E4TEncoder(config)
    whole.load_state_dict(state)
    return ConceptEncoder.fold(whole, tensors["image_features"])


def _install_placeholder(tokenizer, text_encoder, class_word: str) -> PlaceholderEmbedding:
    if PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([PLACEHOLDER])
    placeholder_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    class_ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if len(class_ids) != 1:
        raise UsageError(
            f"class word '{class_word}' is {len(class_ids)} tokens for this base model's tokenizer",
            hint="the domain's class word must be a single token",
        )
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, PlaceholderEmbedding):
        embedding = embedding.base
    wrapper = PlaceholderEmbedding(embedding, placeholder_id, class_ids[0])
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


class E4TModel:
    """Everything one training step or one sampling step needs.

    The base model's weights are frozen and never modified: offsets wrap the
    attention projections, and the placeholder wraps the token embedding.
    """

    def __init__(
        self,
        base: BaseModel,
        class_word: str,
        encoder_config: EncoderConfig,
        offset_config: OffsetConfig,
        placement: Placement,
        concept_tensors: Optional[dict[str, torch.Tensor]] = None,
    ):
        """``concept_tensors``: a concept file's tensors (generation: the concept's encoder, offsets fixed);
        otherwise a fresh encoder and trainable offsets."""
        self.base = base
        self.family = base.family
        self.placement = placement
        self.tokenizer = base.tokenizer
        self.text_encoder = base.text_encoder
        self.vae = base.vae
        self.unet = base.unet
        self.class_word = class_word
        self.encoder_config = encoder_config
        self.offset_config = offset_config
        self.encoder: E4TEncoder | ConceptEncoder
        factors = None
        if concept_tensors is None:
            self.encoder = E4TEncoder(encoder_config).to(placement.device)
        else:
            factors = _factors_by_layer(concept_tensors)
            self.encoder = concept_encoder(encoder_config, concept_tensors).to(placement.device)
        try:
            self.offsets = add_weight_offsets(self.unet, offset_config, factors)
        except KeyError as missing:
            raise UsageError(
                f"the concept has no weight offsets for layer {missing} of this base model",
                hint="generate with the base model the concept was tuned on",
            ) from None
        for parameter in offset_parameters(self.offsets):
            parameter.data = parameter.data.float()
        self.biases: Optional[BiasOffsets] = None
        changes = None if concept_tensors is None else stored_changes(concept_tensors)
        if changes is not None:
            try:
                self.biases = BiasOffsets(self.unet, changes)
            except KeyError as missing:
                raise UsageError(
                    f"the concept's bias changes do not match this base model's layers (first: {missing})",
                    hint="generate with the base model the concept was tuned on",
                ) from None
        if concept_tensors is not None:
            self._load_additive_changes(concept_tensors)
        self.placeholders = [
            _install_placeholder(tokenizer, text_encoder, class_word)
            for tokenizer, text_encoder in zip(base.tokenizers, base.text_encoders)
        ]
        self.placeholder = self.placeholders[0]

    # --- text -------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids: (B, length), or (B, text encoders, length) for a family with several."""
        return self.family.tokenize(self.base.tokenizers, prompts).to(self.placement.device)

    def encode_text(self, input_ids: torch.Tensor, concept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The text states (``e4tcli.models.family``) of ``input_ids``, with ``S*`` = ``concept`` (B x
        embedding width; split across the text encoders' tables, first encoder first) when given."""
        parts = [None] * len(self.placeholders) if concept is None else self.split_concept(concept)
        with ExitStack() as stack:
            for placeholder, part in zip(self.placeholders, parts):
                stack.enter_context(placeholder.using(part))
            return self.family.encode(self.base.text_encoders, input_ids)

    def negative_states(self, negative_prompt: str, count: int) -> torch.Tensor:
        """The text states guidance steers away from: the negative prompt's, or zeros for an empty one where
        the family draws so (SDXL)."""
        states = self.encode_text(self.tokenize([negative_prompt] * count))
        return torch.zeros_like(states) if not negative_prompt and self.family.zeros_for_empty_prompt else states

    def split_concept(self, concept: torch.Tensor) -> list[torch.Tensor]:
        """``S*`` (..., embedding width) as one part per text encoder, in the order of its embedding tables."""
        widths = [placeholder.base.weight.shape[1] for placeholder in self.placeholders]
        return list(torch.split(concept, widths, dim=-1))

    def class_embedding(self) -> torch.Tensor:
        """The class word's embedding (every text encoder's row, concatenated): ``S*`` before any offset."""
        return torch.cat([p.base.weight[p.class_id].detach().float() for p in self.placeholders])

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for ``noisy`` latents under ``text_states``."""
        return self.unet(noisy, timesteps, **self.unet_conditioning(text_states, noisy)).sample

    def unet_conditioning(self, text_states: torch.Tensor, latents: torch.Tensor) -> dict:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        pixel_size = (latents.shape[-2] * factor, latents.shape[-1] * factor)
        return self.family.unet_conditioning(text_states, pixel_size)

    # --- encoder ----------------------------------------------------------
    def unet_features(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """Down-block and mid-block outputs of the UNet, mean-pooled: (B, sum of channels), no gradient."""
        features = []

        def grab(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            features.append(output.float().mean(dim=(2, 3)))

        def grab_and_stop(module, inputs, output):
            grab(module, inputs, output)
            raise _StopAfterMidBlock

        handles = [block.register_forward_hook(grab) for block in self.unet.down_blocks]
        handles.append(self.unet.mid_block.register_forward_hook(grab_and_stop))
        try:
            with torch.no_grad():
                self.unet(noisy, timesteps, **self.unet_conditioning(text_states, noisy))
        except _StopAfterMidBlock:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(features, dim=-1)

    def concept_embedding(
        self,
        image_features: Optional[torch.Tensor],
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        class_states: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S*, offset)`` for each batch element; ``S* = emb(class word) + s * offset``.

        ``image_features``: the references' backbone features; None for a concept's encoder, which holds
        its reference."""
        features = self.unet_features(noisy, timesteps, class_states)
        if isinstance(self.encoder, ConceptEncoder):
            offset = self.encoder(features).float()
        elif image_features is None:
            raise ValueError("the domain encoder needs the references' image features")
        else:
            offset = self.encoder(image_features.float(), features).float()
        return self.class_embedding() + self.encoder_config.scale * offset, offset

    # --- parameters -------------------------------------------------------
    def start_bias_offsets(self) -> BiasOffsets:
        """Additive changes to the UNet's biases and normalization parameters: those the model holds (a
        domain's pre-trained ones), else fresh ones at zero."""
        if self.biases is None:
            self.biases = BiasOffsets(self.unet)
        return self.biases

    def remove_bias_offsets(self) -> None:
        if self.biases is not None:
            self.biases.remove()
            self.biases = None

    def _load_additive_changes(self, concept_tensors: dict[str, torch.Tensor]) -> None:
        try:
            changes = stored_additive_changes(concept_tensors) or {}
            for name, (up, down) in changes.items():
                layer = self.offsets[name]
                if (
                    up.shape[0] != layer.base_layer.weight.shape[0]
                    or down.shape[0] != layer.base_layer.weight[0].numel()
                    or up.shape[1] != down.shape[1]
                ):
                    raise KeyError(name)
                layer.additive = AdditiveChange(up, down, trainable=False).to(layer.base_layer.weight.device)
        except KeyError as missing:
            raise UsageError(
                f"the concept's additive weight changes do not match this base model's layers (first: {missing})",
                hint="generate with the base model the concept was tuned on",
            ) from None

    def start_additive_changes(self, rank: int) -> list[torch.nn.Parameter]:
        """Fresh rank-``rank`` additive changes (``e4tcli.models.additive_changes``) on every offset layer:
        their parameters, for the optimizer."""
        parameters = []
        for layer in self.offsets.values():
            layer.additive = AdditiveChange.fresh(layer.base_layer.weight, rank)
            parameters += list(layer.additive.parameters())
        return parameters

    def remove_additive_changes(self) -> None:
        """Drop the additive changes: the offset layers draw ``W * (1 + dW)`` again."""
        for layer in self.offsets.values():
            layer.additive = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The encoder's and the offsets' parameters (the bias changes are a group of their own)."""
        return list(self.encoder.parameters()) + list(offset_parameters(self.offsets))

    def offsets_squared_norm(self) -> torch.Tensor:
        return offsets_squared_norm(self.offsets)

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters under the names ``trainable_state_dict`` uses."""
        named = {f"encoder.{k}": v for k, v in self.encoder.named_parameters()}
        for name, layer in self.offsets.items():
            named.update({f"offsets.{name}.{k}": v for k, v in layer.offset.named_parameters()})
        if self.biases is not None:
            named.update({f"{BIAS_PREFIX}{k}": v for k, v in self.biases.by_name.items()})
        return named

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder, offset and bias-change parameters, as they train (the domain-checkpoint content)."""
        state = {f"encoder.{k}": v.detach().clone() for k, v in self.encoder.state_dict().items()}
        for name, layer in self.offsets.items():
            state.update({f"offsets.{name}.{k}": v.detach().clone() for k, v in layer.offset.state_dict().items()})
        if self.biases is not None:
            state.update(self.biases.state())
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Encoder, offsets and, where ``state`` has them (a domain that pre-trains them), the bias changes;
        bias changes and additive weight changes the model held before are dropped (a checkpoint has none of
        the latter: they are tuned per concept)."""
        encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        self.encoder.load_state_dict(encoder_state)
        for name, layer in self.offsets.items():
            prefix = f"offsets.{name}."
            layer.offset.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        self.remove_bias_offsets()
        self.remove_additive_changes()
        changes = stored_changes(state)
        if changes is not None:
            self.biases = BiasOffsets(self.unet, changes)

    def concept_state_dict(self, image_features: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """What generation needs: the encoder folded on the reference (``image_features``, needed unless the
        encoder is a concept's already), each offset's two factors (no d x d maps) and the bias changes,
        when the model has them, and the additive weight changes, when it has them."""
        encoder = self.encoder
        if isinstance(encoder, E4TEncoder):
            if image_features is None:
                raise ValueError("a concept's encoder is folded on its reference: pass its image features")
            encoder = ConceptEncoder.fold(encoder, image_features)
        state = {f"encoder.{k}": v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
        with torch.no_grad():
            for name, layer in self.offsets.items():
                column, row = layer.offset.factors()
                state[f"offsets.{name}.column"] = column.detach().float().cpu().contiguous()
                state[f"offsets.{name}.row"] = row.detach().float().cpu().contiguous()
                if layer.additive is not None:
                    state[f"{ADDITIVE_PREFIX}{name}.up"] = layer.additive.up.detach().float().cpu().contiguous()
                    state[f"{ADDITIVE_PREFIX}{name}.down"] = layer.additive.down.detach().float().cpu().contiguous()
        if self.biases is not None:
            state.update(self.biases.state())
        return state

    def describe(self) -> dict:
        return {"encoder": asdict(self.encoder_config), "offsets": asdict(self.offset_config)}
