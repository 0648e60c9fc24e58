"""From a bundle and a prompt to what an inference engine takes, and to the service's prediction.

``InputBuilder.inputs_embeds`` is the ``[1, seq, d]`` tensor a transformers causal LM takes as
``inputs_embeds``; ``prompt_embeds`` the ``[seq, d]`` tensor vLLM takes as ``prompt_embeds``
(``enable_prompt_embeds``). Both hold the same values: the template's tokens through the
checkpoint's own embedding module (which applies its input scale, sqrt(d) on Gemma) and the
user's prompt times the bundle's ``input_scale``, since neither engine scales embeddings it is
handed (vLLM's Gemma 3 applies its normalizer only to token ids it embeds itself).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prompt_migration_client.contract import Bundle
from prompt_migration_client.errors import ContractError
from prompt_migration_client.http import PromptClient

PromptValues = np.ndarray | torch.Tensor


def check_checkpoint(bundle: Bundle, model: PreTrainedModel) -> None:
    """Refuse a checkpoint whose input space is not the bundle's."""
    want = bundle.doc["checkpoint"]
    config = model.config
    got = {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }
    wrong = {k: (v, want.get(k)) for k, v in got.items() if v != want.get(k)}
    if wrong:
        raise ContractError(
            f"The loaded checkpoint does not fit {bundle.model} version {bundle.version} "
            f"(got, bundle): {wrong}. Load the checkpoint the bundle names ({want['name']!r})."
        )


class InputBuilder:
    """Builds a model input from a bundle, a user's prompt and an item's text."""

    def __init__(
        self, bundle: Bundle, *, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        check_checkpoint(bundle, model)
        self.bundle = bundle
        self.model = model
        self.tokenizer = tokenizer
        self.embeddings = model.get_input_embeddings()
        table: torch.Tensor = self.embeddings.weight  # type: ignore[assignment]
        self.dtype: torch.dtype = table.dtype
        self.device: torch.device = table.device
        # Rounded to the compute dtype, as the checkpoint's embedding module rounds its own.
        self.scale = torch.tensor(bundle.input_scale, dtype=self.dtype, device=self.device)
        self._suffix = torch.tensor(bundle.suffix_token_ids, device=self.device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embeddings(ids)
        return out.to(self.dtype)

    @torch.no_grad()
    def prompt_embeds(self, prompt: PromptValues, item_text: str) -> torch.Tensor:
        """``[seq, d]``: prefix tokens, the prompt's ``l`` rows scaled, suffix tokens."""
        self.bundle.check_prompt(prompt)
        rows = torch.as_tensor(np.asarray(prompt, dtype=np.float32), device=self.device)
        prefix = self.tokenizer(self.bundle.prefix_for(item_text), add_special_tokens=True)
        head = self._embed(torch.tensor(prefix["input_ids"], device=self.device))
        user = rows.to(self.dtype) * self.scale
        return torch.cat([head, user, self._embed(self._suffix)], dim=0)

    def inputs_embeds(self, prompt: PromptValues, item_text: str) -> torch.Tensor:
        """``[1, seq, d]``, for ``model(inputs_embeds=...)``."""
        return self.prompt_embeds(prompt, item_text)[None]

    @torch.no_grad()
    def label_logits_of(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[seq, d]`` (or ``[1, seq, d]``) model input -> ``[n_labels]`` fp32 label logits at
        the last position (the checkpoint's own forward, soft-capping included)."""
        batch = embeds if embeds.ndim == 3 else embeds[None]
        out: Any = self.model(inputs_embeds=batch, logits_to_keep=1)
        return out.logits[0, -1, self.bundle.label_token_ids].float()

    def label_logits(self, prompt: PromptValues, item_text: str) -> torch.Tensor:
        return self.label_logits_of(self.prompt_embeds(prompt, item_text))

    def predict(self, prompt: PromptValues, item_text: str) -> float:
        """The task's prediction (a rating, or the probability of Yes) through the head."""
        logits = self.label_logits(prompt, item_text)
        return float(self.bundle.apply_head(logits[None].cpu().numpy())[0])


class Predictor:
    """``predict(user, item_text)``: reads the user's prompt over HTTP, pinned to one version,
    and runs it through a locally loaded checkpoint and the bundle's head."""

    def __init__(
        self,
        client: PromptClient,
        *,
        model_name: str,
        version: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.client = client
        self.bundle = client.bundle(model_name, version)
        self.inputs = InputBuilder(self.bundle, model=model, tokenizer=tokenizer)

    def predict(self, user: str, item_text: str) -> float:
        prompt = self.client.prompt(user, model=self.bundle.model, version=self.bundle.version)
        return self.inputs.predict(prompt.values, item_text)
