"""On-policy distillation across tokenizers (GKD; TRL's GOLD with ``lmbda``): the student samples the completions
of the prompts, then each teacher scores the student's completion rendered in its own chat template.

:class:`xtoken.DistillationTrainer` (``on_policy=lmbda``) decides per optimizer step, from the run's seed and the
step number, whether the step is on-policy (a share ``lmbda`` of the steps); for such a step it asks a
:class:`CompletionGenerator` for one completion per prompt, re-renders every conversation with the student's
completion on every side (:func:`xtoken.align_conversations`' rules) and trains on the completion's chunks.

Sampling is deterministic per prompt: :class:`HFGenerator` draws with the Gumbel-max trick, its noise a hash of
(the prompt's seed, the position, the token), so a prompt's completion does not depend on the batch it is in or on
any random state: two data-parallel ranks sample what one process does, and a resumed run what the uninterrupted
one did. (The seed hashes the prompt's text, so the same prompt twice in one step is sampled once, twice.)
"""

from __future__ import annotations

import abc
import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tokenizer import load_tokenizer

__all__ = [
    "GenerationPrompt", "CompletionGenerator", "HFGenerator", "gumbel_noise", "on_policy_step", "sampling_seed",
]  # fmt: skip

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class GenerationPrompt:
    """One prompt to complete.

    ``messages``: the prompt conversation; ``text``: it rendered with the student's chat template, generation prompt
    included; ``input_ids``: the student's tokens of ``text`` (no special tokens added); ``seed``: this prompt's
    sampling seed (a hash of the run's seed, the step and ``text``).
    """

    messages: list[dict[str, Any]]
    text: str
    input_ids: list[int]
    seed: int


class CompletionGenerator(abc.ABC):
    """Samples the student's completions: the extension point for an external engine (vLLM, SGLang, a server).

    The trainer calls ``generate(model, prompts)`` once per micro-batch of an on-policy step, under
    ``torch.no_grad()``, with the student as it is at that step (the unwrapped module). It returns one completion
    text per prompt: the assistant message's content, without the end-of-turn token (every side renders it
    with its own template; the text must be what the student's tokens decode to, byte for byte, for the
    student's own sequence to be the sampled one).

    An engine-backed generator would push ``model``'s weights into its engine when they changed (once per
    optimizer step), send each ``prompt.input_ids`` (or ``prompt.text``) with ``prompt.seed`` as the request's
    seed, and decode the sampled tokens up to the stop token. xtoken depends on no engine.
    """

    @abc.abstractmethod
    def generate(self, model: torch.nn.Module, prompts: Sequence[GenerationPrompt]) -> list[str]:
        """One completion text per prompt, in order."""


class HFGenerator(CompletionGenerator):
    """``model.generate``: batched, left-padded, without gradients and in eval mode, sampling deterministically
    per prompt (the module docstring).

    Args:
        tokenizer: the student's tokenizer (anything :func:`xtoken.tokenizer.load_tokenizer` takes); completions
            are decoded from its tokens' bytes.
        generation_config: a ``transformers.GenerationConfig`` or a dict of its fields, over the model's own
            generation config. Honoured: ``max_new_tokens`` (default 128), ``do_sample`` (default True; False is
            greedy), ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``eos_token_id`` (the stop tokens; default the
            model's, else the tokenizer's eos: set it to the student template's end-of-turn token), ``pad_token_id``
            and the processors that do not sample (``repetition_penalty``, ``min_new_tokens``, ...). Beam search
            and the other sampling warpers raise a ``ValueError``.
    """

    _UNSUPPORTED = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")

    def __init__(self, tokenizer: Any, generation_config: Any = None) -> None:
        from transformers import GenerationConfig

        if generation_config is None:
            generation_config = GenerationConfig()
        elif isinstance(generation_config, dict):
            generation_config = GenerationConfig(**generation_config)
        elif not isinstance(generation_config, GenerationConfig):
            raise TypeError(
                f"generation_config: expected a transformers.GenerationConfig or a dict, got "
                f"{type(generation_config).__name__}"
            )
        self.generation_config = generation_config
        self.tokenizer = load_tokenizer(tokenizer)

    def _settings(self, model: torch.nn.Module):
        """The config passed to ``generate`` (greedy, with the sampling moved into our processor) and the sampling
        settings: (config, do_sample, temperature, top_k, top_p, min_p, stop ids)."""
        base = getattr(model, "generation_config", None)
        config = copy.deepcopy(base) if base is not None else type(self.generation_config)()
        config.update(**self.generation_config.to_diff_dict())
        for name in self._UNSUPPORTED:
            if getattr(config, name, None) not in (None, 1.0, 0.0):
                raise ValueError(f"generation_config.{name}: not supported by HFGenerator (temperature, top_k, "
                                 "top_p and min_p are)")  # fmt: skip
        if (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1:
            raise ValueError("generation_config: HFGenerator samples one completion per prompt (num_beams = "
                             "num_return_sequences = 1)")  # fmt: skip
        stop = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.roles.get("eos")
        stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        if not stop:
            raise ValueError(
                "generation_config.eos_token_id: no stop token (set the student template's end-of-turn id)"
            )
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.roles.get("pad", stop[0])
        sampling = (
            config.do_sample is not False,
            1.0 if config.temperature is None else float(config.temperature),
            config.top_k or 0,
            1.0 if config.top_p is None else float(config.top_p),
            config.min_p,
        )
        config.update(
            do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None, eos_token_id=stop,
            pad_token_id=pad, max_new_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, max_length=None,
        )  # fmt: skip
        return config, sampling, stop

    def generate(self, model: torch.nn.Module, prompts: Sequence[GenerationPrompt]) -> list[str]:
        from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        if not prompts:
            return []
        config, (do_sample, temperature, top_k, top_p, min_p), stop = self._settings(model)
        device = next(model.parameters()).device
        width = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            if prompt.input_ids:
                input_ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids)
                attention_mask[row, width - len(prompt.input_ids) :] = 1
        processors = LogitsProcessorList()
        if do_sample:
            warpers = []
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            if min_p is not None:
                warpers.append(MinPLogitsWarper(min_p))
            processors.append(_GumbelSampling(warpers, [p.seed for p in prompts], width))
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    generation_config=config, logits_processor=processors,
                )  # fmt: skip
        finally:
            model.train(training)
        return [self.decode(ids, stop) for ids in output[:, width:].tolist()]

    def decode(self, ids: Sequence[int], stop: Sequence[int] = ()) -> str:
        """The text of ``ids`` up to the first stop token: the tokens' bytes (a special token's own string; nothing
        for an id outside the vocabulary), invalid UTF-8 replaced by U+FFFD."""
        stops = set(stop)
        surface, strings = self.tokenizer.surface_bytes, self.tokenizer.token_strings
        out = []
        for i in ids:
            if i in stops:
                break
            if 0 <= i < len(surface):
                out.append(surface[i] if surface[i] is not None else (strings[i] or "").encode())
        return b"".join(out).decode("utf-8", "replace")


class _GumbelSampling:
    """A logits processor that turns greedy decoding into sampling: the configured warpers, then Gumbel noise
    hashed from each row's seed, the position and the token (argmax of scores + Gumbel noise is a sample of
    softmax(scores))."""

    def __init__(self, warpers: list, seeds: list[int], prompt_width: int) -> None:
        self.warpers = warpers
        self.seeds = torch.tensor(seeds, dtype=torch.int64)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        noise = gumbel_noise(self.seeds.to(scores.device), input_ids.shape[1] - self.prompt_width, scores.shape[-1])
        return scores + noise.to(scores.dtype)


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``x`` in [0, 2**32), in int64 without overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (a bijection with good avalanche: Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """float32 ``[B, V]`` standard Gumbel noise, a pure function of (``seeds[b]``, ``position``, token): the same
    on any device, in any batch."""
    seeds = seeds.to(torch.int64)
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _mix32(low ^ _mix32(high ^ _mix32(torch.full_like(seeds, (position * 0x9E3779B9 + 1) & _MASK32))))
    token = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64))
    bits = _mix32(_mix32(row[:, None] ^ token[None, :]) ^ row[:, None])
    uniform = (bits.double() + 0.5) / 2.0**32
    return (-torch.log(-torch.log(uniform))).float()


def _hash_int(*parts: Any) -> int:
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_seed(seed: int, step: int, text: str) -> int:
    """The sampling seed of a prompt at an optimizer step of a run (63 bits)."""
    return _hash_int("prompt", seed, step, text)


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step ``step`` of a run is on-policy: a deterministic draw with probability ``lmbda``, the
    same on every rank and after a resume."""
    if lmbda <= 0:
        return False
    return lmbda >= 1 or _hash_int("step", seed, step) / 2.0**63 < lmbda
