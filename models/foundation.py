"""A frozen foundation LM that scores task labels for users' soft prompts.

A prompt sequence is ``prefix(item) + <user prompt tokens> + suffix``. The user tokens come
after the item text on purpose: the frozen model's keys and values over the prefix do not depend
on the user, so they are computed once per item and reused (``PrefixCache``); a training step then
runs only the ``l + len(suffix)`` tokens that do depend on the user, and its attention
(``models.attention``) leaves the cached states out of the backward pass. ``label_logits_full``
is the plain full-sequence forward the cache is measured and tested against.

Only the label tokens' logits at the answer position are computed: never the full vocabulary.
Where the tokenizer spells every label as shared leading tokens plus one token (" 1" is a space
token and a digit for SmolLM2 and Gemma), the shared tokens are part of what runs before the
answer position (``AnswerTokens``): the label's own token is scored where the model predicts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models import attention
from models.checkpoints import resolve_checkpoint
from models.errors import CheckpointError, ShapeMismatchError
from models.prefix_cache import PrefixCache, state_fingerprint


@dataclass(frozen=True)
class AnswerTokens:
    """What runs after the user's prompt (``suffix_ids``) and the label tokens scored at its
    last position (``label_ids``, one per label, in the task's order)."""

    suffix_ids: list[int]
    label_ids: list[int]


def spell_answer(
    tokenizer: PreTrainedTokenizerBase, suffix: str, labels: tuple[str, ...], *, name: str
) -> AnswerTokens:
    """The suffix's tokens, then the leading tokens all of " label" share, and each label's
    last token: one scored token per label, at the position where the model predicts it."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    spelled = [ids(" " + label) for label in labels]
    leads = {tuple(row[:-1]) for row in spelled}
    label_ids = [row[-1] for row in spelled]
    if len(leads) != 1 or len(set(label_ids)) != len(label_ids):
        pieces = [tokenizer.convert_ids_to_tokens(row) for row in spelled]
        raise CheckpointError(
            f"Labels {labels} are spelled {pieces} by {name}'s tokenizer: each must be "
            "one distinct token after leading tokens all labels share. Use such label words."
        )
    return AnswerTokens(suffix_ids=ids(suffix) + list(leads.pop()), label_ids=label_ids)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32 (bf16 emulation is slower)."""
    if device.type == "cuda":
        return torch.bfloat16
    cpu_has_bf16 = (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    return torch.bfloat16 if cpu_has_bf16 else torch.float32


class FoundationModel:
    """A frozen causal LM plus what soft prompts need from it."""

    def __init__(
        self,
        *,
        name: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.decoder: nn.Module = model.base_model
        self.embeddings: nn.Module = model.get_input_embeddings()
        self.embedding_table: torch.Tensor = self.embeddings.weight  # type: ignore[assignment]
        self.hidden_size: int = int(model.config.hidden_size)
        # Gemma scales input embeddings by sqrt(d) inside its embedding module; prompts live in the
        # raw table space and get the same scale when spliced in.
        self.embed_scale = float(getattr(self.embeddings, "embed_scale", 1.0))
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.prefix_cache = prefix_cache or PrefixCache(device=device)

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        state_dir: Path | None = None,
        state_max_bytes: int | None = None,
    ) -> FoundationModel:
        """``state_dir``: where the per-item states are kept across processes (a directory per
        checkpoint and machine kind is made in it), at most ``state_max_bytes`` for every model
        together; None keeps them in memory only."""
        path = resolve_checkpoint(name_or_path)
        torch_device = torch.device(device) if device else default_device()
        torch_dtype = dtype or default_dtype(torch_device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attention.NAME
            )
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"Could not load a causal LM from {path}: {error}") from error
        model.to(torch_device)  # type: ignore[arg-type]
        kept = None
        if state_dir is not None:
            kept = state_dir / state_fingerprint(path, dtype=torch_dtype, device=torch_device)
        return cls(
            name=name_or_path,
            model=model,
            tokenizer=tokenizer,
            device=torch_device,
            dtype=torch_dtype,
            prefix_cache=PrefixCache(
                directory=kept, max_bytes=state_max_bytes, device=torch_device
            ),
        )

    @property
    def embedding_std(self) -> float:
        return float(self.embedding_table.float().std())

    def token_ids(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def answer_tokens(self, suffix: str, labels: tuple[str, ...]) -> AnswerTokens:
        """See ``spell_answer``."""
        return spell_answer(self.tokenizer, suffix, labels, name=self.name)

    def raw_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the input embedding table, unscaled, fp32: ``[..., d]``."""
        return self.embedding_table[token_ids.to(self.device)].float()

    def check_prompts(self, prompts: torch.Tensor) -> None:
        if prompts.ndim != 3 or prompts.shape[-1] != self.hidden_size:
            raise ShapeMismatchError(
                f"Prompts of shape {tuple(prompts.shape)} do not fit {self.name}: expected "
                f"[batch, l, {self.hidden_size}]. Migrate them to this model first."
            )

    # -- prefix cache -------------------------------------------------------------------------

    @torch.no_grad()
    def warm_prefixes(
        self, texts: list[str], *, batch_size: int = 16, width_multiple: int = 16
    ) -> None:
        """Compute and keep the frozen keys/values of every text not cached yet.

        A text's states must not depend on which other texts were missing with it (the work
        done before), or a seeded training run would not reproduce: CPU bf16 kernels round
        differently for small batches and for other padded widths. So every forward runs exactly
        ``batch_size`` rows (a short chunk filled with copies of its first text) padded to a
        width fixed by the text's own length, the next multiple of ``width_multiple``. The
        defaults are small because a job's later calls warm a few new texts at a time, each
        paying for a whole padded batch (bench/README.md, "The fold and the item states' fill")."""
        fill = (batch_size, width_multiple)
        todo = self.prefix_cache.missing(texts, fill=fill)
        if not todo:
            return
        encoded = {text: self.token_ids(text, special=True) for text in todo}
        by_width: dict[int, list[str]] = {}
        for text, tokens in encoded.items():
            by_width.setdefault(-(-len(tokens) // width_multiple) * width_multiple, []).append(text)
        computed: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        for width, group in sorted(by_width.items()):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                rows = [encoded[t] for t in chunk]
                rows += [rows[0]] * (batch_size - len(rows))
                computed |= self._prefix_states(chunk, rows, width)
        self.prefix_cache.add(computed, fill=fill, seconds=time.perf_counter() - started)

    def _prefix_states(
        self, texts: list[str], rows: list[list[int]], width: int
    ) -> dict[str, torch.Tensor]:
        """One forward over ``rows`` (``texts``' tokens first, then fillers) right-padded to
        ``width``: each text's keys/values over its own tokens."""
        pad = self.tokenizer.pad_token_id or 0
        # Right padding: real tokens never attend to the pads after them (causal mask).
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device
        )
        # A cache without the config keeps every position on every layer: a sliding-window
        # layer's cache (Gemma-3's local layers) would keep only the batch's last positions,
        # not each text's own.
        out = self.decoder(
            input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True
        )
        layers = out.past_key_values.layers
        states = {}
        for row, text in enumerate(texts):
            n = len(rows[row])
            per_layer = [torch.stack([la.keys[row, :, :n], la.values[row, :, :n]]) for la in layers]
            states[text] = torch.stack(per_layer)
        return states

    def _batched_prefix(self, texts: list[str]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Left-padded cache of the texts' prefixes, their attention mask and lengths."""
        self.warm_prefixes(texts)
        states = [self.prefix_cache.states[t] for t in texts]
        lengths = torch.tensor([s.shape[-2] for s in states], device=self.device)
        width = int(lengths.max())
        padded = torch.stack(
            [nn.functional.pad(s, (0, 0, width - s.shape[-2], 0)) for s in states], dim=2
        )  # [layers, 2, batch, kv_heads, width, head_dim]
        cache = DynamicCache(config=self.model.config)
        for layer_index in range(padded.shape[0]):
            cache.update(padded[layer_index, 0], padded[layer_index, 1], layer_index)
        columns = torch.arange(width, device=self.device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return cache, mask, lengths

    # -- scoring ------------------------------------------------------------------------------

    def _label_head(self, hidden: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
        output = self.model.get_output_embeddings()
        assert output is not None
        weight = output.weight[label_ids]
        logits = hidden.float() @ weight.float().T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _suffix_embeddings(self, prompts: torch.Tensor, suffix_ids: list[int]) -> torch.Tensor:
        tail = self.embeddings(torch.tensor(suffix_ids, device=self.device))
        tail = tail.expand(prompts.shape[0], -1, -1)
        users = prompts.to(device=self.device, dtype=self.dtype) * self.embed_scale
        return torch.cat([users, tail.to(self.dtype)], dim=1)

    def label_logits(
        self, prefixes: list[str], prompts: torch.Tensor, *, answer: AnswerTokens
    ) -> torch.Tensor:
        """Logits of the label tokens after ``prefix + prompt + answer.suffix_ids``.

        prefixes: one text per example (the item part of the template); prompts: ``[B, l, d]``
        in raw embedding space. Returns ``[B, n_labels]`` fp32, differentiable in ``prompts``.
        """
        self.check_prompts(prompts)
        cache, prefix_mask, lengths = self._batched_prefix(prefixes)
        inputs = self._suffix_embeddings(prompts, answer.suffix_ids)
        steps = torch.arange(inputs.shape[1], device=self.device)
        mask = torch.cat(
            [prefix_mask, torch.ones_like(prefix_mask[:, :1]).expand(-1, len(steps))], 1
        )
        out = self.decoder(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=lengths[:, None] + steps[None, :],
            past_key_values=cache,
            use_cache=True,
        )
        return self._label_head(out.last_hidden_state[:, -1], answer.label_ids)

    def label_logits_full(
        self, prefixes: list[str], prompts: torch.Tensor, *, answer: AnswerTokens
    ) -> torch.Tensor:
        """The same scores by one plain forward over the whole sequence (no prefix reuse)."""
        self.check_prompts(prompts)
        prefix_ids = [self.token_ids(t, special=True) for t in prefixes]
        width = max(map(len, prefix_ids))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefix_ids], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prefix_ids], device=self.device
        )
        head = self.embeddings(ids).to(self.dtype)
        inputs = torch.cat([head, self._suffix_embeddings(prompts, answer.suffix_ids)], dim=1)
        mask = torch.cat(
            [
                mask,
                torch.ones(
                    len(prefixes), inputs.shape[1] - width, dtype=mask.dtype, device=self.device
                ),
            ],
            1,
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions)
        return self._label_head(out.last_hidden_state[:, -1], answer.label_ids)
