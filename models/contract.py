"""The inference contract of a prompt set: what a consumer outside this service needs to turn a
user's stored prompt into the service's own prediction.

The model input is ``embed(tokens(prefix with the item; special tokens on))``, then the user's
prompt ``[l, d]`` times ``input_scale``, then ``embed(suffix_token_ids)``; the logits of the label
tokens at the last position (after the checkpoint's final soft-capping, if any) go through the
task head. ``embed`` is the checkpoint's own input embedding module, which applies
``input_scale`` itself (Gemma: sqrt(d)); a stored prompt is a row of the raw embedding table, so
whoever splices it into the input applies the scale (``SPACES`` in the client's contract module,
which names the spaces and the contract's version for the service and its consumers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from prompt_migration_client.contract import RAW
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from models.foundation import spell_answer
from models.tasks import Task


@dataclass(frozen=True)
class CheckpointFacts:
    """What identifies a checkpoint's input space and answer logits."""

    model_type: str
    hidden_size: int
    vocab_size: int
    input_scale: float  # what the input embedding module multiplies table rows by
    final_logit_softcapping: float | None

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def same_space(self, other: dict[str, Any]) -> bool:
        """Whether ``other`` (another checkpoint's ``public()``) shares this input space."""
        keys = ("model_type", "hidden_size", "vocab_size")
        return all(other.get(key) == getattr(self, key) for key in keys)


def checkpoint_facts(path: Path) -> CheckpointFacts:
    """Read a checkpoint's facts from its config, building the model on the meta device (no
    weights are loaded), so the scale is the embedding module's own, whatever the family."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = model.get_input_embeddings()
    scale = getattr(embeddings, "scalar_embed_scale", None)
    if scale is None:
        buffer = getattr(embeddings, "embed_scale", None)
        scale = 1.0 if buffer is None else float(buffer)
    softcap = getattr(config, "final_logit_softcapping", None)
    return CheckpointFacts(
        model_type=str(config.model_type),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        input_scale=float(scale),
        final_logit_softcapping=None if softcap is None else float(softcap),
    )


def head_steps(task: Task) -> list[dict[str, Any]]:
    """The head as a list of operations on the label logits ``z`` ``[n_labels]`` (fp32), in
    order; tensor names are the keys of the head's safetensors file."""
    if task.name == "rating":
        return [
            {"op": "center", "doc": "z - mean(z)"},
            {"op": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
            {"op": "silu"},
            {"op": "linear", "weight": "mlp.2.weight", "bias": "mlp.2.bias"},
            {"op": "silu"},
            {"op": "linear", "weight": "mlp.4.weight", "bias": "mlp.4.bias"},
            {"op": "squeeze", "doc": "[1] -> scalar"},
            {"op": "clamp", "min": 1.0, "max": 5.0},
        ]
    return [
        {"op": "difference", "doc": "z[1] - z[0]: Yes minus No"},
        {"op": "affine", "scale": "scale", "bias": "bias"},
        {"op": "sigmoid"},
    ]


def prediction_of(task: Task) -> str:
    if task.name == "rating":
        return "a rating in [1, 5]"
    return "the probability of Yes"


def describe(
    *, task: Task, tokenizer: PreTrainedTokenizerBase, facts: CheckpointFacts, model_name: str
) -> dict[str, Any]:
    """The ML part of a set's bundle: task, template, scale and how to apply the head."""
    answer = spell_answer(tokenizer, task.template.suffix, task.labels, name=model_name)
    return {
        "task": {
            "name": task.name,
            "labels": list(task.labels),
            "label_token_ids": answer.label_ids,
            "metrics": list(task.metric_names),
            "primary_metric": task.primary_metric,
            "prediction": prediction_of(task),
        },
        "template": {
            "prefix": task.template.prefix,
            "item_placeholder": "{item}",
            "prefix_add_special_tokens": True,
            "suffix": task.template.suffix,
            "suffix_token_ids": answer.suffix_ids,
            "answer_position": "last",
            "sequence": "tokens(prefix.format(item), special tokens on) + prompt rows + "
            "suffix_token_ids; score label_token_ids at the last position",
        },
        "scale": {
            "stored_space": RAW,
            "input_scale": facts.input_scale,
            "input_scale_rounding": "to the model's compute dtype, as its embedding module does",
            "applied_by": {
                "service": "itself, when it scores a stored prompt",
                "transformers_inputs_embeds": "the consumer (inputs_embeds bypass the "
                "embedding module that scales token rows)",
                "vllm_prompt_embeds": "the consumer (vLLM uses prompt_embeds as given)",
                "peft_prompt_tuning": "already in its vectors (PEFT concatenates them with the "
                "embedding module's scaled output)",
            },
        },
        "head": {"steps": head_steps(task), "input": "label logits at the answer position, fp32"},
    }
