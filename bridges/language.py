"""Language bridge: a frozen Hugging Face LLM that reads a soft visual prompt.

Stage 2 of BLIP-2 projects the Q-Former's query outputs into the LLM's embedding space and puts
them in front of the text as a "soft prompt". This module is the LLM side of that: it embeds ids,
builds the inputs of one training step (soft prompt, prompt, caption, labels), returns the LM loss,
and generates text. Any causal (OPT, GPT-2, Llama, Qwen2, ...) or sequence-to-sequence (T5/FlanT5,
BART) model of transformers works; `AutoConfig.is_encoder_decoder` picks the layout:

    decoder-only     [soft prompt; BOS + prompt; caption + end of text; pad...]    labels on the caption
    encoder-decoder  encoder [soft prompt; prompt + caption prefix + </s>; pad...]
                     decoder labels: caption suffix + </s>

The LLM is frozen: no parameter requires grad and it stays in eval mode (no dropout) even when the
model that holds it trains. Gradients still flow through it into the soft prompt. `add_lora` puts a
LoRA adapter (peft) on it: then only the adapter trains (see `bridges.lora`), and `model` is the
`PeftModel` around the LLM.

Legend: b batch, q soft-prompt (query) tokens, t text tokens, s encoder tokens, d LLM embedding width.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bridges import lora
from bridges.dtypes import resolve_compute_dtype
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EndOfText = Literal["auto", "eos", "newline"]
IGNORE_INDEX = -100  # label value that transformers' cross-entropy skips


def prefix_lm_split(caption: str, u: float) -> tuple[str, str]:
    """Split a caption into (prefix, suffix) for prefix-LM pretraining (BLIP-2 with FlanT5).

    The split point k, in words, lies in [1, n // 2] (at least one word of prefix, at least half the
    caption left to predict); `u` in [0, 1) picks it uniformly. Captions of fewer than two words are
    not split: the whole caption is the suffix, so the decoder always has words to predict.
    """
    words = caption.split()
    if len(words) < 2:
        return "", caption
    k = 1 + int(u * (len(words) // 2))
    return " ".join(words[:k]), " ".join(words[k:])


def _prompt_piece(prompt: str) -> str:
    """The prompt as tokenized: trailing spaces dropped (see `_text_piece`)."""
    return prompt.rstrip(" ")


def _text_piece(prompt: str, text: str) -> str:
    """The text as tokenized after `prompt`.

    Prompt and text are tokenized separately (so that the prompt's tokens, which get no label, are
    known exactly) but should give the tokens of the joined string "a photo of a dog". BPE word
    tokens carry their leading space ("Ġdog", "▁dog"), so the space between prompt and text goes
    with the text, never as a lone token at the end of the prompt. Generation continues right after
    the prompt's last token, so it then produces the same tokens that training taught.
    """
    if not prompt or prompt[-1] in "\n\t":  # after a newline the text starts a fresh line
        return text
    return " " + text.lstrip(" ")


class LanguageBridge(nn.Module):
    """A frozen causal or seq2seq LLM fed with a soft prompt of width `hidden_size`.

    Build it with `from_pretrained`; the constructor takes an already loaded model and tokenizer,
    freezes the model and fixes up the tokenizer (pad token) or rejects it (wrong vocabulary).

    end_of_text: "newline" ends every caption with "\\n" and stops generation there (the original
        BLIP-2 OPT convention), "eos" uses the tokenizer's EOS token, "auto" picks "newline" for
        OPT and "eos" for every other model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        end_of_text: EndOfText = "auto",
    ) -> None:
        super().__init__()
        _check_end_of_text(end_of_text)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.lora: lora.LoraSettings | None = None  # set by `add_lora`

        # frozen, declared here: no parameter trains and dropout stays off (see `train`)
        self.model.requires_grad_(False)
        self.model.eval()

        embeddings = model.get_input_embeddings()
        # the width of `inputs_embeds`; for OPT-350m this is word_embed_proj_dim, not hidden_size
        self.hidden_size: int = embeddings.embedding_dim

        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"The tokenizer of {name} has neither a pad token nor an EOS token; set "
                    "`tokenizer.pad_token` before building the LanguageBridge."
                )
            # padding positions are always masked out and get no label, so any token id will do
            warnings.warn(
                f"The tokenizer of {name} has no pad token; using its EOS token {tokenizer.eos_token!r} "
                "as the pad token.",
                stacklevel=2,
            )
            tokenizer.pad_token = tokenizer.eos_token
        _check_tokenizer_fits(tokenizer, embeddings.num_embeddings, name)

        if end_of_text == "auto":
            end_of_text = "newline" if model.config.model_type == "opt" else "eos"
        self.end_of_text: Literal["eos", "newline"] = end_of_text
        if end_of_text == "newline":
            ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f'end_of_text="newline" needs "\\n" to be one token, but the tokenizer of {name} '
                    f'splits it into {tokenizer.convert_ids_to_tokens(ids)}; use end_of_text="eos".'
                )
            self.end_token_id: int = ids[0]
        else:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    f'end_of_text="eos" but the tokenizer of {name} has no EOS token; use '
                    'end_of_text="newline" or set `tokenizer.eos_token`.'
                )
            self.end_token_id = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id

        # The special tokens the tokenizer wraps a text with: [BOS] in front for OPT and Llama,
        # </s> behind for T5, nothing for GPT-2. We tokenize without them and add them ourselves,
        # so that the prompt's tokens (BOS included) are known exactly.
        self.special_prefix, self.special_suffix = _special_tokens_around_text(tokenizer)

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        end_of_text: EndOfText = "auto",
    ) -> LanguageBridge:
        """Load a hub name or local folder: weights in `compute_dtype` (default: per device, see
        `bridges.dtypes`) on `device` (default: CPU, as transformers; accelerate moves it), frozen."""
        name = str(name_or_path)
        _check_end_of_text(end_of_text)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = resolve_compute_dtype(compute_dtype, device)
        config = AutoConfig.from_pretrained(name)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
        # fail before loading what may be gigabytes of weights; __init__ checks the real table again
        if isinstance(getattr(config, "vocab_size", None), int):
            _check_tokenizer_fits(tokenizer, config.vocab_size, name)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(name, config=config, dtype=dtype).to(device)
        return cls(model, tokenizer, name=name, end_of_text=end_of_text)

    @property
    def spec(self) -> dict[str, str]:
        """What a checkpoint records to rebuild this bridge (JSON-able)."""
        return {"name": self.name, "end_of_text": self.end_of_text}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kwargs: Any) -> LanguageBridge:
        """Rebuild from `spec`; `kwargs` go to `from_pretrained` (tokenizer, device, compute_dtype)."""
        unknown = sorted(set(spec) - {"name", "end_of_text"})
        if "name" not in spec or unknown:
            raise ValueError(
                f"A language bridge spec needs 'name' and may have 'end_of_text'; got keys "
                f"{sorted(spec)}{f' (unknown: {unknown})' if unknown else ''}."
            )
        return cls.from_pretrained(spec["name"], end_of_text=spec.get("end_of_text", "auto"), **kwargs)

    # --- frozen --------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> LanguageBridge:
        # `parent.train()` reaches every submodule; the frozen LLM must keep dropout off anyway,
        # or its outputs (and the soft prompt's gradients) would be noisy for no benefit. A LoRA
        # adapter's own dropout follows `mode`.
        super().train(mode)
        self.model.eval()
        if self.lora is not None:
            lora.set_dropout(self.model, mode)
        return self

    # --- LoRA ----------------------------------------------------------------------------------

    def add_lora(self, settings: lora.LoraSettings | dict[str, Any], *, key: str = "lora") -> lora.LoraSettings:
        """Put a LoRA adapter on the frozen LLM, in place: its A and B matrices train, every weight
        of the LLM stays frozen. `target_modules` None takes peft's choice for the model type
        (OPT, Llama: q_proj, v_proj; T5: q, v; GPT-2: c_attn). Returns the settings with the
        targets filled in; `key` names the setting in errors."""
        settings = lora.LoraSettings.from_value(settings, key=key)
        if self.lora is not None:
            raise ValueError(f"The LLM {self.name} already has a LoRA adapter; add one adapter only.")
        if settings.target_modules is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

            model_type = self.model.config.model_type
            if model_type not in DEFAULTS:
                raise ValueError(
                    f"peft has no default LoRA layers for {model_type!r} models ({self.name}): set "
                    f"`{key}.target_modules`, e.g. to some of its Linear layers: {lora.linear_names(self.model)}."
                )
            settings = settings.with_targets(DEFAULTS[model_type])
        task_type = "SEQ_2_SEQ_LM" if self.is_encoder_decoder else "CAUSAL_LM"
        self.model = lora.wrap(self.model, settings, task_type=task_type, key=key, what=f"the LLM {self.name}")
        self.lora = settings
        lora.set_dropout(self.model, self.training)
        return settings

    def save_adapter(self, directory: str | Path) -> Path:
        """The LoRA adapter alone, in peft's format (`PeftModel.from_pretrained(llm, directory)`)."""
        if self.lora is None:
            raise ValueError(f"The LLM {self.name} has no LoRA adapter to save.")
        return lora.save(self.model, directory)

    def load_adapter(self, directory: str | Path) -> None:
        """Load the weights of an adapter saved by `save_adapter` into this bridge's (same settings)."""
        if self.lora is None:
            raise ValueError(f"The LLM {self.name} has no LoRA adapter: call `add_lora` with its settings first.")
        lora.load(self.model, directory, settings=self.lora, what=f"the LLM {self.name}")

    def merged(self) -> LanguageBridge:
        """For exporters: a copy whose `model` is the plain transformers LLM with the LoRA adapter
        added into its weights (peft's `merge_and_unload`), or this bridge itself when it has no
        adapter. This bridge keeps its adapter; the copy needs the memory of a second LLM."""
        if self.lora is None:
            return self
        plain = lora.merged_copy(self.model)
        return LanguageBridge(plain, copy.deepcopy(self.tokenizer), name=self.name, end_of_text=self.end_of_text)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # --- the three operations -----------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids.to(self.device))  # (b, t, d)

    def training_inputs(
        self,
        soft_prompt: Tensor,
        texts: list[str],
        prompts: list[str] | str | None = None,
        *,
        max_length: int = 32,
        prefix_lm: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The keyword arguments of `forward` for soft prompts (b, q, d) and their captions.

        prompts: text between the soft prompt and the caption (e.g. "a photo of"), one per item or
            one for all; it gets no label.
        max_length: most caption tokens, the end-of-text token included (the original's 32).
            Encoder-decoder: also the most tokens of prompt + prefix on the encoder side.
        prefix_lm: encoder-decoder only: move a random prefix of each caption (see
            `prefix_lm_split`, drawn with `generator`) to the encoder, as BLIP-2's FlanT5
            pretraining does. Without it (caption fine-tuning) the decoder predicts the whole caption.
        """
        b = soft_prompt.shape[0]
        prompts = self._check_batch(soft_prompt, prompts)
        if len(texts) != b:
            raise ValueError(f"Got {b} soft prompts but {len(texts)} texts; pass one text per soft prompt.")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}.")
        if prefix_lm and not self.is_encoder_decoder:
            raise ValueError(
                f"prefix_lm=True splits captions between encoder and decoder, but {self.name} is a "
                "decoder-only model; leave prefix_lm=False."
            )
        soft_prompt = soft_prompt.to(device=self.device, dtype=self.dtype)  # stays in the graph

        if self.is_encoder_decoder:
            if prefix_lm:
                draws = torch.rand(b, generator=generator).tolist()
                splits = [prefix_lm_split(text, u) for text, u in zip(texts, draws)]
            else:
                splits = [("", text) for text in texts]
            # one tokenizer call: encoder texts (prompt + caption prefix), then decoder targets
            encoder_texts = [
                _prompt_piece(p) + (_text_piece(p, prefix) if prefix else "") for p, (prefix, _) in zip(prompts, splits)
            ]
            suffixes = [suffix for _, suffix in splits]
            encoded = self.tokenizer(encoder_texts + suffixes, add_special_tokens=False)["input_ids"]
            inputs_embeds, attention_mask = self._encoder_inputs(soft_prompt, encoded[:b], max_length)
            targets = [ids[: max_length - 1] + [self.end_token_id] for ids in encoded[b:]]
            width = max(map(len, targets))
            labels = [ids + [IGNORE_INDEX] * (width - len(ids)) for ids in targets]  # right padding
            # transformers builds the decoder inputs by shifting the labels right behind the decoder
            # start token (T5: the pad id), with -100 read as pad
            return {
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "labels": torch.tensor(labels, device=self.device),
            }

        # decoder-only: one tokenizer call for all prompts and all texts
        pieces = [_prompt_piece(p) for p in prompts] + [_text_piece(p, t) for p, t in zip(prompts, texts)]
        encoded = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        prompt_ids = [self.special_prefix + ids for ids in encoded[:b]]
        # the end-of-text token is kept when a caption is cut, so every target ends as captions do
        text_ids = [ids[: max_length - 1] + [self.end_token_id] for ids in encoded[b:]]

        q = soft_prompt.shape[1]
        width = max(len(p) + len(t) for p, t in zip(prompt_ids, text_ids))
        ids, mask, labels = [], [], []
        for p, t in zip(prompt_ids, text_ids):
            pad = width - len(p) - len(t)  # right padding
            ids.append(p + t + [self.pad_token_id] * pad)
            mask.append([1] * (q + len(p) + len(t)) + [0] * pad)
            # no label on the soft prompt, the prompt (BOS included) and the padding; transformers
            # shifts the labels itself, so position i holds the token at i
            labels.append([IGNORE_INDEX] * (q + len(p)) + t + [IGNORE_INDEX] * pad)
        token_embeds = self.embed(torch.tensor(ids, device=self.device))  # (b, t, d)
        return {
            "inputs_embeds": torch.cat([soft_prompt, token_embeds], dim=1),  # (b, q + t, d)
            "attention_mask": torch.tensor(mask, device=self.device),
            "labels": torch.tensor(labels, device=self.device),
        }

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled tokens (from `training_inputs`)."""
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss

    @torch.no_grad()
    def generate(
        self,
        soft_prompt: Tensor,
        prompts: list[str] | str | None = None,
        *,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        do_sample: bool = False,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        **kwargs: Any,
    ) -> list[str]:
        """One string per soft prompt (b, q, d), cut at the end-of-text token and stripped.
        Defaults are the original's (beam 5, max 30); `kwargs` go to `model.generate`."""
        prompts = self._check_batch(soft_prompt, prompts)
        soft_prompt = soft_prompt.to(device=self.device, dtype=self.dtype)
        encoded = self.tokenizer([_prompt_piece(p) for p in prompts], add_special_tokens=False)["input_ids"]

        if self.is_encoder_decoder:
            inputs_embeds, attention_mask = self._encoder_inputs(soft_prompt, encoded, max_length=None)
        else:
            inputs_embeds, attention_mask = self._left_padded_inputs(soft_prompt, encoded)

        options: dict[str, Any] = {
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "do_sample": do_sample,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": self.end_token_id,
            "pad_token_id": self.pad_token_id,
        }
        # passed only where they act: transformers warns about flags that the mode ignores
        if do_sample:
            options["top_p"] = top_p
        if num_beams > 1:
            options["length_penalty"] = length_penalty
        options.update(kwargs)
        out = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **options)

        # Decoder-only models given only inputs_embeds return the new tokens alone; encoder-decoder
        # models return the decoder's start token first (for BART it equals EOS, so drop it
        # before looking for the end of the text).
        rows = out.tolist()
        if self.is_encoder_decoder:
            rows = [row[1:] for row in rows]
        rows = [row[: row.index(self.end_token_id)] if self.end_token_id in row else row for row in rows]
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # --- helpers -------------------------------------------------------------------------------

    def _check_batch(self, soft_prompt: Tensor, prompts: list[str] | str | None) -> list[str]:
        if soft_prompt.dim() != 3 or soft_prompt.shape[-1] != self.hidden_size:
            raise ValueError(
                f"The soft prompt must be (batch, queries, {self.hidden_size}) for {self.name}, got "
                f"{tuple(soft_prompt.shape)}; project the Q-Former outputs to `bridge.hidden_size`."
            )
        b = soft_prompt.shape[0]
        if prompts is None:
            return [""] * b
        if isinstance(prompts, str):
            return [prompts] * b
        if len(prompts) != b:
            raise ValueError(f"Got {b} soft prompts but {len(prompts)} prompts; pass one prompt per soft prompt.")
        return list(prompts)

    def _encoder_inputs(
        self, soft_prompt: Tensor, encoded: list[list[int]], max_length: int | None
    ) -> tuple[Tensor, Tensor]:
        """Encoder side: [soft prompt; special prefix + tokens + special suffix; pad...]."""
        rows = [self.special_prefix + ids[:max_length] + self.special_suffix for ids in encoded]
        width = max(map(len, rows))
        q = soft_prompt.shape[1]
        ids = [row + [self.pad_token_id] * (width - len(row)) for row in rows]
        mask = [[1] * (q + len(row)) + [0] * (width - len(row)) for row in rows]
        token_embeds = self.embed(torch.tensor(ids, device=self.device))  # (b, s, d)
        return torch.cat([soft_prompt, token_embeds], dim=1), torch.tensor(mask, device=self.device)

    def _left_padded_inputs(self, soft_prompt: Tensor, encoded: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Decoder-only generation input: [pad...; soft prompt; BOS + prompt], left padded so that
        every row's next token comes at the same position. transformers derives the position ids
        from the attention mask, so each item sees the positions it would see alone."""
        b, q, d = soft_prompt.shape
        rows = [self.special_prefix + ids for ids in encoded]
        width = q + max(map(len, rows))
        ids, mask, soft_slots = [], [], []
        for row in rows:
            pad = width - q - len(row)
            ids.append([self.pad_token_id] * (pad + q) + row)  # the q slots get the soft prompt below
            mask.append([0] * pad + [1] * (q + len(row)))
            soft_slots.append([False] * pad + [True] * q + [False] * len(row))
        token_embeds = self.embed(torch.tensor(ids, device=self.device))  # (b, q + t, d)
        slots = torch.tensor(soft_slots, device=self.device).unsqueeze(-1)  # (b, q + t, 1)
        # masked_scatter fills the True slots in row-major order: row i gets soft_prompt[i]
        inputs_embeds = token_embeds.masked_scatter(slots, soft_prompt)
        return inputs_embeds, torch.tensor(mask, device=self.device)


def _check_end_of_text(end_of_text: str) -> None:
    if end_of_text not in ("auto", "eos", "newline"):
        raise ValueError(f'end_of_text must be "auto", "eos" or "newline", got {end_of_text!r}.')


def _check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, num_rows: int, name: str) -> None:
    """Every id the tokenizer can produce must index the model's input embedding table. A larger
    table is fine (vocabularies are often padded to a multiple of 64)."""
    problems = []
    if len(tokenizer) > num_rows:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but the model's input embedding table has {num_rows} rows"
        )
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None and not 0 <= value < num_rows:
            problems.append(f"{attr}={value} is outside the embedding table's {num_rows} rows")
    if problems:
        raise ValueError(
            f"The tokenizer does not match the language model {name}: {'; '.join(problems)}. "
            "Use the tokenizer saved with this model (leave `tokenizer=None`); the LLM is frozen, so "
            "resizing its embeddings for new tokens would leave them untrained."
        )


def _special_tokens_around_text(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts before a text, ids it puts after), found by encoding a probe text
    with and without special tokens."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(
        f"Cannot tell which special tokens the tokenizer adds: 'a' encodes as {bare} alone and as "
        f"{full} with special tokens. Pass a tokenizer whose special tokens only wrap the text."
    )
