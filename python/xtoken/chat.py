"""Conversations across tokenizers: SPEC.md §2 applied per message.

The student and the teacher wrap the same messages in different chat templates (Llama-3's header tokens, Qwen's
ChatML, ...). Each side renders a conversation with its own template and tokenizes the rendering as a whole (so
the student sees exactly what it sees at inference). Then:

- every token gets a byte span in the *content stream*: the UTF-8 bytes of the trained messages' contents, back
  to back. A token of the template gets an empty span (never a target, never in a chunk); a token that holds
  template text and content text (``"\\n\\n"`` before a content that starts with ``"\\n"``) spans its content
  bytes only; the contents of messages that are not trained (``train_on="assistant"``: user and system
  messages) count as template;
- both sides align on that stream exactly as texts do (:func:`xtoken.align.align_spans`), and a message
  boundary acts as an empty token: a chunk that would hold the end of one message and the start of the next is
  dropped (``empty_inside``), so chunks never cross a message boundary;
- a template that does not render a content verbatim (it strips, escapes, drops, repeats or reorders it) raises
  a ``ValueError`` naming the conversation and the message: there is no fallback to positional alignment.

The student's CE labels cover the trained contents and, after each trained assistant message, the tokens the
template closes it with (``<|eot_id|>``, ``<|im_end|>\\n``): the student must learn to stop. With
``train_on="all"`` the CE covers every token, as for plain text, and the losses every message's content.

A conversation is a list of ``{"role", "content"}`` messages, a mapping with ``"messages"``, or a mapping with
``"prompt"`` and ``"completion"`` (lists of messages, or strings: one user message and one assistant message).
A prompt/completion example trains on its completion only; the prompt is context.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from .align import (
    AlignedBatch,
    AlignStats,
    SpanTokenizer,
    TokenSpans,
    _pad,
    _Padded,
    _padding_side,
    _place_empty,
    align_spans,
    as_span_tokenizer,
)
from .tokenizer import TokenizerAdapter, load_tokenizer

__all__ = [
    "CHAT_TEMPLATES",
    "TRAIN_ON",
    "Conversation",
    "ChatTemplate",
    "align_conversations",
    "render_prompts",
]

TRAIN_ON = ("assistant", "all")

CHAT_TEMPLATES = {
    # Llama-3's header template (without its tool and date preamble); like the original it trims contents, so
    # a content with surrounding whitespace is reported as altered.
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    # ChatML as Qwen writes it (without Qwen's default system message); no BOS.
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}
"""Built-in chat templates, by name (``ChatTemplate(tokenizer, "chatml")``): ``llama3`` (Llama-3's header tokens,
BOS first) and ``chatml`` (Qwen's ``<|im_start|>``/``<|im_end|>``, no BOS). Tokenizers that carry their own
template (``tokenizer.chat_template``) need none."""

# What a message's content is replaced with to find where the template puts it: letters and digits only, which
# no template strips or escapes; the delimiting letters keep message 1 from being a prefix of message 10.
_PLACEHOLDER = "xtokenmessage{}q"


# ---------------------------------------------------------------------------------------------
# Conversations


@dataclass(frozen=True)
class Conversation:
    """A conversation: its messages (plain dicts with a string ``"content"``), for a prompt/completion example
    the index of the first completion message (``None`` otherwise), and whether the last message is a sampled
    completion (``generated``: every side renders the prompt with its generation prompt and appends the text as
    it is, as the model saw it, instead of rendering the last message through its template)."""

    messages: tuple[dict[str, Any], ...]
    completion_start: int | None = None
    generated: bool = False

    @classmethod
    def parse(cls, example: Any, where: str = "conversation") -> Conversation:
        """A conversation from a list of messages, a mapping with ``"messages"``, or a mapping with ``"prompt"``
        (and usually ``"completion"``)."""
        if isinstance(example, Conversation):
            return example
        if isinstance(example, Mapping) and "messages" in example:
            return cls(_messages(example["messages"], where))
        if isinstance(example, Mapping) and "prompt" in example:
            prompt = _messages(example["prompt"], f"{where} prompt", default_role="user")
            completion = example.get("completion")
            completion = () if completion is None else _messages(completion, f"{where} completion", "assistant")
            return cls(prompt + completion, completion_start=len(prompt))
        if isinstance(example, Sequence) and not isinstance(example, (str, bytes)):
            return cls(_messages(example, where))
        raise TypeError(
            f"{where}: expected a list of {{'role', 'content'}} messages or a mapping with 'messages' or "
            f"'prompt'/'completion', got {type(example).__name__}"
        )

    def trained(self, train_on: str) -> list[bool]:
        """Which messages the losses train on: every one (``"all"``), or the assistant messages (of the completion,
        for a prompt/completion example)."""
        if train_on == "all":
            return [True] * len(self.messages)
        first = self.completion_start or 0
        return [i >= first and m["role"] == "assistant" for i, m in enumerate(self.messages)]

    def prompt(self) -> list[dict[str, Any]]:
        """What on-policy generation continues: the messages before the completion; for a plain conversation,
        the messages before its final assistant message (all of them if it does not end with one)."""
        end = self.completion_start
        if end is None:
            end = len(self.messages) - (bool(self.messages) and self.messages[-1]["role"] == "assistant")
        return [dict(m) for m in self.messages[:end]]

    def with_completion(self, text: str) -> Conversation:
        """The prompt followed by the sampled completion ``text`` (a ``generated`` prompt/completion conversation)."""
        prompt = self.prompt()
        message = {"role": "assistant", "content": text}
        return Conversation((*prompt, message), completion_start=len(prompt), generated=True)


def _messages(value: Any, where: str, default_role: str | None = None) -> tuple[dict[str, Any], ...]:
    if isinstance(value, str) and default_role is not None:
        return ({"role": default_role, "content": value},)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{where}: expected a list of {{'role', 'content'}} messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TypeError(f"{where}, message {i}: expected a mapping with a 'role' string, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise TypeError(
                f"{where}, message {i} ({message['role']}): 'content' must be a string, got "
                f"{type(message.get('content')).__name__} (content parts and tool calls without text are not "
                "supported)"
            )
        messages.append(dict(message))
    return tuple(messages)


# ---------------------------------------------------------------------------------------------
# Chat templates


@functools.lru_cache(maxsize=64)
def _compiled(source: str):
    """A Jinja chat template compiled as transformers compiles them (sandboxed, trim_blocks, lstrip_blocks)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


@dataclass(frozen=True)
class _Layout:
    """A rendered conversation: its text, where each message's content sits in it (character offsets) and where
    the template's closing of each message ends (its content's end when there is none)."""

    text: str
    content_starts: list[int]
    content_ends: list[int]
    closing_ends: list[int]


class ChatTemplate:
    """How one side renders conversations.

    Args:
        tokenizer: the side's tokenizer. A transformers tokenizer renders with its own ``apply_chat_template``.
        template: ``None`` (the tokenizer's own ``chat_template``), a Jinja template (rendered as transformers
            renders chat templates, with the tokenizer's ``bos_token``, ``eos_token``, ... as variables), a name in
            :data:`CHAT_TEMPLATES`, or a callable ``(messages, add_generation_prompt) -> str``.
    """

    def __init__(self, tokenizer: Any = None, template: str | Callable[..., str] | None = None) -> None:
        if isinstance(template, str) and template in CHAT_TEMPLATES:
            template = CHAT_TEMPLATES[template]
        if template is not None and not (isinstance(template, str) or callable(template)):
            raise TypeError(
                f"chat template: expected a Jinja string, a name or a callable, got {type(template).__name__}"
            )
        self.template = template
        # What rendering needs, and nothing else (a collator holding this is pickled into DataLoader workers):
        # a transformers tokenizer renders itself; otherwise the special-token strings (resolved on first use
        # for a name or path, which would have to be loaded).
        self._renderer = tokenizer if callable(getattr(tokenizer, "apply_chat_template", None)) else None
        self._special = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else _special_tokens(tokenizer)
        self._pieces_cache: dict[tuple, list[str]] = {}

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it."""
        messages = [dict(m) for m in messages]
        if callable(self.template):
            text = self.template(messages, add_generation_prompt=add_generation_prompt)
        elif self._renderer is not None and (self.template or getattr(self._renderer, "chat_template", None)):
            text = self._renderer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        elif self.template is not None:
            text = _compiled(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens()
            )
        else:
            raise ValueError(
                "the tokenizer has no chat template: give one (a Jinja string, a name in "
                f"xtoken.chat.CHAT_TEMPLATES such as {sorted(CHAT_TEMPLATES)}, or a callable)"
            )
        if not isinstance(text, str):
            raise TypeError(f"chat template: rendered a {type(text).__name__}, expected a str")
        return text

    def _special_tokens(self) -> dict[str, str]:
        if not isinstance(self._special, dict):
            self._special = _special_tokens(load_tokenizer(self._special))
        return self._special

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pieces_cache"] = {}
        return state

    # ------------------------------------------------------------------ where the contents go
    def layout(self, conversation: Conversation, *, closings: bool, where: str) -> _Layout:
        """Render ``conversation`` and find its contents; with ``closings``, also the closing of each assistant
        message (what the template writes right after it when it is the last message, as far as the full rendering
        continues the same way). A ``generated`` conversation is its prompt rendered with the generation prompt,
        then its last content as it is."""
        messages = conversation.messages
        rendered = messages[:-1] if conversation.generated else messages
        text = self.render(rendered, add_generation_prompt=conversation.generated)
        pieces = self._pieces(rendered, where, add_generation_prompt=conversation.generated)
        if conversation.generated:
            text, pieces = text + messages[-1]["content"], [*pieces, ""]
        contents = [m["content"] for m in messages]
        expected = "".join(chain.from_iterable(zip(pieces, contents))) + pieces[-1]
        if text != expected:
            raise ValueError(self._altered(text, expected, pieces, contents, messages, where))
        starts, ends, closing_ends, at = [], [], [], 0
        for i, (piece, content) in enumerate(zip(pieces, contents)):
            at += len(piece)
            starts.append(at)
            at += len(content)
            ends.append(at)
            closing = 0
            if closings and messages[i]["role"] == "assistant" and i < len(rendered):
                own = self._pieces(messages[: i + 1], where)[-1]
                closing = len(os.path.commonprefix([own, pieces[i + 1]]))
            closing_ends.append(at + closing)
        return _Layout(text, starts, ends, closing_ends)

    def _pieces(self, messages: Sequence[Mapping[str, Any]], where: str, add_generation_prompt: bool = False):
        """The template's own text around the contents: ``pieces[i]`` comes before message i's content, the last
        piece after the last content. Found once per conversation shape (roles and other keys)."""
        shape = [{k: v for k, v in m.items() if k != "content"} for m in messages]
        key = json.dumps([shape, add_generation_prompt], sort_keys=True, default=str)
        pieces = self._pieces_cache.get(key)
        if pieces is not None:
            return pieces
        skeleton = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        rendered = self.render(skeleton, add_generation_prompt)
        pieces, at = [], 0
        for i, message in enumerate(messages):
            mark = _PLACEHOLDER.format(i)
            found = rendered.find(mark, at)
            if found < 0 or mark in rendered[found + len(mark) :]:
                raise ValueError(
                    f"{where}, message {i} ({message['role']}): the chat template does not render this message's "
                    "content exactly once and in order (it drops, repeats or reorders contents); alignment needs "
                    "every content verbatim in the rendering"
                )
            pieces.append(rendered[at:found])
            at = found + len(mark)
        pieces.append(rendered[at:])
        if len(self._pieces_cache) >= 4096:
            self._pieces_cache.clear()
        self._pieces_cache[key] = pieces
        return pieces

    @staticmethod
    def _altered(text, expected, pieces, contents, messages, where) -> str:
        differ = next((k for k, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
        i, at = 0, 0
        for i, (piece, content) in enumerate(zip(pieces, contents)):
            at += len(piece) + len(content)
            if differ < at:
                break
        return (
            f"{where}, message {i} ({messages[i]['role']}): the chat template does not render the content verbatim "
            f"(it strips, escapes or rewrites it; rendered {text[max(differ - 20, 0) : differ + 20]!r} where the "
            f"content gives {expected[max(differ - 20, 0) : differ + 20]!r}); alignment never falls back to "
            "positions: fix the data (e.g. strip the content) or the template"
        )


def _special_tokens(tokenizer: Any) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` of an xtoken tokenizer adapter (a template
    rendered by xtoken sees them as transformers templates do); none for other tokenizers."""
    if not isinstance(tokenizer, TokenizerAdapter):
        return {}
    hf = tokenizer.hf_tokenizer()
    return {f"{role}_token": hf.id_to_token(i) for role, i in tokenizer.roles.items()}


# ---------------------------------------------------------------------------------------------
# One side: render, tokenize, map spans into the content stream


def _utf8_offsets(text: str, positions: Sequence[int]) -> list[int]:
    """Byte offsets of increasing character offsets of ``text``."""
    if text.isascii():
        return list(positions)
    out, char, byte = [], 0, 0
    for p in positions:
        byte += len(text[char:p].encode("utf-8", "surrogatepass"))
        char = p
        out.append(byte)
    return out


def _to_stream(x: np.ndarray, sequence: np.ndarray, regions: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Global byte offsets of the renderings (``x``, in sequence ``sequence``) -> content-stream offsets: inside a
    region (a trained content) its stream offset; between regions the stream offset where the last one ended (0
    before the first one of the sequence)."""
    if not regions:
        return np.zeros_like(x)
    start, length, stream, region_sequence = (np.asarray(column, dtype=np.int64) for column in zip(*regions))
    k = np.maximum(np.searchsorted(start, x, side="right") - 1, 0)
    valid = (start[k] <= x) & (region_sequence[k] == sequence)
    return np.where(valid, stream[k] + np.minimum(x - start[k], length[k]), 0)


@dataclass(frozen=True)
class _Side:
    padded: _Padded
    labels: torch.Tensor  # int64 [B, T]


def _encode_side(
    tokenizer: SpanTokenizer,
    template: ChatTemplate,
    conversations: Sequence[Conversation],
    trained: Sequence[Sequence[bool]],
    *,
    train_on: str,
    max_length: int | None,
    left: bool,
    side: str,
) -> _Side:
    layouts = [
        template.layout(c, closings=train_on == "assistant", where=f"{side} template, conversation {b}")
        for b, c in enumerate(conversations)
    ]
    texts = [layout.text for layout in layouts]
    encoded = tokenizer.encode_spans(texts, add_special_tokens=False, max_length=None)
    sequence = np.repeat(np.arange(len(texts)), encoded.lengths)

    # Trained contents and closings in byte offsets of the renderings laid back to back ("global" offsets).
    regions: list[tuple[int, int, int, int]] = []  # (global start, length, stream offset, sequence)
    closing_start, closing_end = [], []
    text_base = [0]
    for b, (layout, flags) in enumerate(zip(layouts, trained)):
        positions = list(chain.from_iterable(zip(layout.content_starts, layout.content_ends, layout.closing_ends)))
        offsets = _utf8_offsets(layout.text, positions + [len(layout.text)])
        base, stream = text_base[-1], 0
        for i, flag in enumerate(flags):
            start, end, closing = offsets[3 * i : 3 * i + 3]
            if not flag:
                continue
            regions.append((base + start, end - start, stream, b))
            stream += end - start
            if closing > end:
                closing_start.append(base + end)
                closing_end.append(base + closing)
        text_base.append(base + offsets[-1])
    offset = np.asarray(text_base, dtype=np.int64)[sequence]
    a, z = offset + encoded.spans[:, 0], offset + encoded.spans[:, 1]
    spans = np.stack([_to_stream(a, sequence, regions), _to_stream(z, sequence, regions)], axis=1)
    if train_on == "all":
        train_ce = np.ones(sequence.size, dtype=bool)
    else:
        train_ce = spans[:, 1] > spans[:, 0]
        if closing_start:
            cs, ce = np.asarray(closing_start, dtype=np.int64), np.asarray(closing_end, dtype=np.int64)
            k = np.searchsorted(cs, a, side="right") - 1
            train_ce |= (k >= 0) & (a < ce[np.maximum(k, 0)])
    ids, lengths = encoded.ids, encoded.lengths
    if max_length is not None:
        first = np.cumsum(lengths) - lengths
        keep = np.arange(sequence.size) - first[sequence] < max_length
        ids, spans, sequence, train_ce = ids[keep], spans[keep], sequence[keep], train_ce[keep]
        lengths = np.minimum(lengths, max_length)
    spans = _place_empty(spans, sequence)
    padded = _pad(TokenSpans(ids=ids, spans=spans, lengths=lengths), tokenizer.pad_token_id, left)
    labeled = TokenSpans(ids=np.where(train_ce, ids, -100), spans=spans, lengths=lengths)
    labels = _pad(labeled, -100, left).input_ids
    return _Side(padded, labels)


def _message_starts(conversations: Sequence[Conversation], trained: Sequence[Sequence[bool]]) -> list[list[int]]:
    """Per conversation, the content-stream offsets where a trained message starts after another one."""
    out = []
    for conversation, flags in zip(conversations, trained):
        contents = [m["content"] for m, t in zip(conversation.messages, flags) if t]
        lengths = [len(c.encode("utf-8", "surrogatepass")) for c in contents]
        out.append(np.cumsum(lengths[:-1]).tolist())
    return out


def _align_sides(student: _Padded, teacher: _Padded, message_starts: list[list[int]], padding_side: str):
    """Chunks of two encoded sides, without the chunks that cross a message boundary (counted as ``empty_inside``);
    returns the ``[K, 4]`` table, the chunks per sequence and the statistics."""
    alignment = align_spans(
        student.ends, student.lengths, teacher.ends, teacher.lengths,
        student_padding_side=padding_side, teacher_padding_side=padding_side,
    )  # fmt: skip
    chunks = alignment.table()
    counts = alignment.counts.clone()
    dropped = alignment.dropped.clone()
    boundaries = [(b, m) for b, starts in enumerate(message_starts) for m in starts]
    if boundaries and chunks.shape[0]:
        table = chunks.numpy().astype(np.int64)
        width = student.spans.shape[1]
        flat = student.spans.reshape(-1, 2).numpy().astype(np.int64)
        sequence = (table[:, 0] + 1) // width
        stride = max(int(flat[:, 1].max()), max(m for _, m in boundaries)) + 1
        lo = sequence * stride + flat[table[:, 0] + 1, 0]
        hi = sequence * stride + flat[table[:, 1], 1]
        marks = np.array(sorted(b * stride + m for b, m in boundaries), dtype=np.int64)
        k = np.searchsorted(marks, lo, side="right")
        crossing = (k < marks.size) & (marks[np.minimum(k, marks.size - 1)] < hi)
        if crossing.any():
            counts -= torch.from_numpy(np.bincount(sequence[crossing], minlength=counts.numel()).astype(np.int32))
            for side, (first, last) in enumerate(((0, 1), (2, 3))):
                targets = table[crossing, last] - table[crossing, first]
                lost = np.bincount(sequence[crossing], targets, counts.numel())
                dropped[:, side, 1] += torch.from_numpy(lost.astype(np.int32))
            chunks = chunks[torch.from_numpy(~crossing)]
    return chunks, counts, AlignStats.compute(chunks, dropped)


def _check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on: expected one of {TRAIN_ON}, got {train_on!r}")


def _as_template(tokenizer: Any, template: Any) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else ChatTemplate(tokenizer, template)


def align_conversations(
    conversations: Sequence[Any],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    max_length: int | None = None,
    train_on: str = "assistant",
    student_template: Any = None,
    teacher_template: Any = None,
    padding_side: str = "right",
) -> AlignedBatch:
    """Render a batch of conversations with each side's chat template and align the two renderings exactly
    (SPEC.md §2 per message; see the module docstring for the rules).

    Args:
        conversations: lists of ``{"role", "content"}`` messages, mappings with ``"messages"``, or mappings with
            ``"prompt"``/``"completion"`` (:meth:`Conversation.parse`).
        student_tokenizer, teacher_tokenizer: transformers fast tokenizers (their ``apply_chat_template`` renders),
            or anything :func:`xtoken.align.as_span_tokenizer` takes together with an explicit template.
        max_length: keep at most this many tokens of each rendering (template tokens included); a chunk that the
            cut goes through is dropped as ``truncated``.
        train_on: ``"assistant"`` (the losses and the CE on the assistant messages, plus the CE on the tokens that
            close them) or ``"all"`` (the losses on every message, the CE on every token).
        student_template, teacher_template: each side's template (:class:`ChatTemplate`'s ``template``), or a
            :class:`ChatTemplate`; ``None``: the tokenizer's own.
        padding_side: ``"right"`` or ``"left"``, for both sides.

    Returns:
        An :class:`xtoken.AlignedBatch` whose spans index the content stream (the trained contents' bytes back to
        back) and whose ``student_labels`` hold the CE labels (-100 where the CE does not train).
    """
    if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence):
        raise TypeError("conversations: expected a sequence of conversations")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
    _check_train_on(train_on)
    left = _padding_side(padding_side, "padding_side")
    parsed = [Conversation.parse(c, f"conversation {b}") for b, c in enumerate(conversations)]
    trained = [c.trained(train_on) for c in parsed]
    sides = []
    for name, tokenizer, template in (
        ("student", student_tokenizer, student_template),
        ("teacher", teacher_tokenizer, teacher_template),
    ):
        sides.append(_encode_side(
            as_span_tokenizer(tokenizer), _as_template(tokenizer, template), parsed, trained,
            train_on=train_on, max_length=max_length, left=left, side=name,
        ))  # fmt: skip
    student, teacher = sides
    starts = _message_starts(parsed, trained)
    chunks, counts, stats = _align_sides(student.padded, teacher.padded, starts, padding_side)
    return AlignedBatch(
        student_input_ids=student.padded.input_ids,
        student_attention_mask=student.padded.attention_mask,
        student_spans=student.padded.spans,
        student_targets=student.padded.targets,
        teacher_input_ids=teacher.padded.input_ids,
        teacher_attention_mask=teacher.padded.attention_mask,
        teacher_spans=teacher.padded.spans,
        teacher_targets=teacher.padded.targets,
        chunks=chunks,
        chunk_counts=counts,
        stats=stats,
        student_labels=student.labels,
    )


def render_prompts(
    conversations: Sequence[Conversation], tokenizer: SpanTokenizer, template: ChatTemplate
) -> list[tuple[str, list[int]]]:
    """Each conversation's :meth:`Conversation.prompt` rendered with the generation prompt (what the model
    continues) and tokenized as a whole: ``(text, ids)`` pairs."""
    texts = [template.render(c.prompt(), add_generation_prompt=True) for c in conversations]
    encoded = tokenizer.encode_spans(texts, add_special_tokens=False, max_length=None)
    bounds = np.cumsum(encoded.lengths).tolist()
    return [(t, encoded.ids[e - n : e].tolist()) for t, n, e in zip(texts, encoded.lengths.tolist(), bounds)]
