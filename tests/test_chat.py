"""Conversation alignment: the student and the teacher render the same messages with their own chat templates
(a Llama-3 header template with BOS and a ChatML template without, written in tokenizers_util), over the real
Llama-3.2 and Qwen vocabularies when installed and over tokenizers trained here. Every chunk's two sides carry
the same bytes, no template token is ever a target, chunks never cross a message boundary, the CE labels cover
the trained contents and the tokens that close them, and a template that alters a content raises."""

from __future__ import annotations

import functools
import json
import pickle
import re

import pytest
import torch
from tokenizers_util import CHATML_TEMPLATE, INST_TEMPLATE, LLAMA3_TEMPLATE, chat_tokenizer

from xtoken import align_conversations
from xtoken.chat import ChatTemplate, Conversation
from xtoken.distill import DistillationCollator
from xtoken.tokenizer import load_tokenizer

pytest.importorskip("transformers")

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "How many cats in 2024?"},
        {"role": "assistant", "content": "In 2024 there were 201 cats, 7 dogs and 3.5% more birds."},
        {"role": "user", "content": "Café?"},
        {"role": "assistant", "content": "Café crème — naïve 日本語 😀👍🏽"},
    ],
    [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now code:"},
        {"role": "assistant", "content": "def main():\n    return [x * 2 for x in range(100)]\n\n\tdone"},
    ],
    [{"role": "user", "content": "Only a question, no answer"}],
]


@functools.cache
def real(name: str):
    try:
        return load_tokenizer(name)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(str(e))


def stream(conversation, train_on: str) -> bytes:
    """The content stream: the trained messages' contents, back to back."""
    parsed = Conversation.parse(conversation)
    return b"".join(m["content"].encode() for m, t in zip(parsed.messages, parsed.trained(train_on)) if t)


def message_starts(conversation, train_on: str) -> set[int]:
    parsed = Conversation.parse(conversation)
    lengths = [len(m["content"].encode()) for m, t in zip(parsed.messages, parsed.trained(train_on)) if t]
    return {sum(lengths[:i]) for i in range(1, len(lengths))}


def check(conversations, batch, student, teacher, train_on: str = "assistant", truncated: bool = False):
    """Every property of an aligned conversation batch. ``student``/``teacher``: xtoken tokenizer adapters (their
    surface bytes are an independent decoding of the tokens)."""
    first = 0
    for b, conversation in enumerate(conversations):
        data = stream(conversation, train_on)
        covered = {}
        for side, adapter in (("student", student), ("teacher", teacher)):
            mask = getattr(batch, f"{side}_attention_mask")[b].bool()
            ids = getattr(batch, f"{side}_input_ids")[b][mask].tolist()
            spans = getattr(batch, f"{side}_spans")[b][mask].tolist()
            end = 0
            for token_id, (a, z) in zip(ids, spans):
                if a == z:
                    continue
                # A token with text is no special token, starts where the one before ended, and its bytes hold
                # the content bytes it spans (all of them, or the end or start of a token that also holds
                # template text).
                assert token_id not in adapter.special_ids, (side, b, adapter.token_strings[token_id])
                assert a == end, (side, b, a, end)
                surface = adapter.surface_bytes[token_id]
                piece = data[a:z]
                assert surface == piece or surface.endswith(piece) or surface.startswith(piece), (side, surface, piece)
                end = z
            covered[side] = end
            if not truncated:
                assert end == len(data), (side, b)
        count = int(batch.chunk_counts[b])
        chunks = batch.chunks[first : first + count].tolist()
        first += count
        starts = message_starts(conversation, train_on)
        previous = None
        for s0, s1, t0, t1 in chunks:
            pieces = []
            for side, r0, r1 in (("student", s0, s1), ("teacher", t0, t1)):
                width = getattr(batch, f"{side}_input_ids").shape[1]
                assert r0 // width == r1 // width == b
                flat = getattr(batch, f"{side}_spans").reshape(-1, 2)
                targets = flat[r0 + 1 : r1 + 1].tolist()
                assert all(a < z for a, z in targets), "an empty (template) token is a target"
                assert all(targets[i][1] == targets[i + 1][0] for i in range(len(targets) - 1))
                pieces.append((targets[0][0], targets[-1][1]))
            assert pieces[0] == pieces[1]  # both sides carry the same bytes
            lo, hi = pieces[0]
            assert not any(lo < m < hi for m in starts), "a chunk crosses a message boundary"
            assert previous is None or lo >= previous
            previous = hi
    assert first == batch.chunks.shape[0]


def labels_check(batch, student, conversations, end_of_turn: int):
    """The CE trains the tokens with text and the end-of-turn token after each trained assistant message."""
    for b, conversation in enumerate(conversations):
        mask = batch.student_attention_mask[b].bool()
        labels = batch.student_labels[b][mask].tolist()
        ids = batch.student_input_ids[b][mask].tolist()
        spans = batch.student_spans[b][mask].tolist()
        for token_id, label, (a, z) in zip(ids, labels, spans):
            if a < z:
                assert label == token_id
            elif label != -100:  # the end-of-turn token, or the template's newline after it
                assert label == token_id
                assert token_id == end_of_turn or student.surface_bytes[token_id] == b"\n"
        assistants = sum(m["role"] == "assistant" for m in Conversation.parse(conversation).messages)
        assert labels.count(end_of_turn) == assistants


# ---------------------------------------------------------------------------------------------
# The real Llama-3.2 (header template, BOS) and Qwen (ChatML, no BOS) vocabularies


def real_pair(conversations, **kwargs):
    return align_conversations(
        conversations, real("llama3.2"), real("qwen"), student_template=LLAMA3_TEMPLATE,
        teacher_template=CHATML_TEMPLATE, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_real_pair_multi_turn(train_on):
    batch = real_pair(CONVERSATIONS, train_on=train_on)
    check(CONVERSATIONS, batch, real("llama3.2"), real("qwen"), train_on)
    llama = real("llama3.2")
    assert batch.student_input_ids[0, 0] == llama.roles["bos"]  # BOS on the student side only
    assert real("qwen").token_strings[int(batch.teacher_input_ids[0, 0])] == "<|im_start|>"
    assert batch.stats.chunks > 20 and batch.chunks.shape[0] == int(batch.chunk_counts.sum())
    assert batch.stats.student_dropped["empty_inside"] == 0
    if train_on == "assistant":
        labels_check(batch, llama, CONVERSATIONS, llama.get_vocab()["<|eot_id|>"])
    else:  # the CE trains on every token
        assert torch.equal(batch.student_labels[batch.student_attention_mask.bool()],
                           batch.student_input_ids[batch.student_attention_mask.bool()])  # fmt: skip


def tokens_of_chunks(batch, student, teacher, b: int = 0):
    words = []
    for s0, s1, t0, t1 in batch.chunks.tolist():
        if s0 // batch.student_input_ids.shape[1] != b:
            continue
        words.append((
            [student.token_strings[i] for i in batch.student_input_ids.reshape(-1)[s0 + 1 : s1 + 1].tolist()],
            [teacher.token_strings[i] for i in batch.teacher_input_ids.reshape(-1)[t0 + 1 : t1 + 1].tolist()],
        ))  # fmt: skip
    return words


def test_real_pair_numerals_form_one_to_n_chunks():
    conversation = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "In 2024 and 201."}]
    batch = real_pair([conversation])
    words = tokens_of_chunks(batch, real("llama3.2"), real("qwen"))
    i = words.index((["202"], ["2", "0", "2"]))
    assert words[i + 1] == (["4"], ["4"])
    assert (["201"], ["2", "0", "1"]) in words
    # The first content chunk is predicted from the template's last token on each side.
    assert words[0] == (["In"], ["In"])


def chunk_bytes(batch) -> list[tuple[int, int, int, int]]:
    """Each chunk as (first byte, end byte, student targets, teacher targets)."""
    flat = batch.student_spans.reshape(-1, 2)
    return [(int(flat[s0 + 1, 0]), int(flat[s1, 1]), s1 - s0, t1 - t0) for s0, s1, t0, t1 in batch.chunks.tolist()]


def test_real_pair_truncation_inside_a_message():
    conversation = CONVERSATIONS[0]
    full = real_pair([conversation])
    # 40 tokens cut the teacher inside the first answer's "201" (Qwen splits digits: it is the longer side).
    batch = real_pair([conversation], max_length=40)
    check([conversation], batch, real("llama3.2"), real("qwen"), truncated=True)
    qwen = real("qwen")
    assert [qwen.token_strings[i] for i in batch.teacher_input_ids[0, -3:].tolist()] == ["Ġ", "2", "0"]
    assert batch.stats.teacher_dropped["truncated"] == 2 and batch.stats.student_dropped["truncated"] > 0
    # The chunks kept are the full batch's first ones, up to the one the cut goes through.
    kept = chunk_bytes(batch)
    assert kept == chunk_bytes(full)[: len(kept)] and 0 < len(kept) < full.stats.chunks
    assert stream(conversation, "assistant")[: kept[-1][1]] == b"In 2024 there were "


@pytest.mark.parametrize("max_length", [None, 24, 40, 64])
def test_each_conversation_aligns_in_a_batch_as_alone(max_length):
    student, teacher = chat_tokenizer("llama3"), chat_tokenizer("chatml")
    conversations = CONVERSATIONS + [CONVERSATIONS[1][:2], CONVERSATIONS[0][::-1][1:]]
    batch = align_conversations(conversations, student, teacher, max_length=max_length)
    check(conversations, batch, adapter("llama3"), adapter("chatml"), truncated=max_length is not None)
    first = 0
    for b, conversation in enumerate(conversations):
        alone = align_conversations([conversation], student, teacher, max_length=max_length)
        count = int(batch.chunk_counts[b])
        width = batch.student_input_ids.shape[1], batch.teacher_input_ids.shape[1]
        rows = [(s0 - b * width[0], s1 - b * width[0], t0 - b * width[1], t1 - b * width[1])
                for s0, s1, t0, t1 in batch.chunks[first : first + count].tolist()]  # fmt: skip
        assert rows == [tuple(c) for c in alone.chunks.tolist()], b
        first += count


def test_a_message_start_past_the_cut_leaves_the_next_conversation_alone():
    # Conversation 0 is cut inside its first answer; its second answer starts (at byte 11 of the stream) past
    # every byte the batch reaches, which must not drop a chunk of conversation 1.
    first = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The quick b"},
             {"role": "user", "content": "x"}, {"role": "assistant", "content": "pq"}]  # fmt: skip
    second = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "In 201 there were 42 cats, 7 dogs"}]
    student, teacher = chat_tokenizer("llama3"), chat_tokenizer("chatml")
    batch = align_conversations([first, second], student, teacher, max_length=22)
    alone = align_conversations([second], student, teacher, max_length=22)
    assert int(batch.chunk_counts[1]) == alone.stats.chunks == 2


def test_real_pair_left_padding_gives_the_same_chunks():
    right, left = real_pair(CONVERSATIONS), real_pair(CONVERSATIONS, padding_side="left")
    assert right.stats == left.stats
    check(CONVERSATIONS, left, real("llama3.2"), real("qwen"))


def test_a_template_that_alters_a_content_raises():
    padded = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " 42 \n"}]
    with pytest.raises(ValueError, match=r"conversation 0, message 1 \(assistant\).*verbatim"):
        real_pair([CONVERSATIONS[1], padded][1:])  # Llama-3's template trims the content
    escaping = CHATML_TEMPLATE.replace("message['content']", "message['content'] | e")
    with pytest.raises(ValueError, match=r"message 0 \(user\).*verbatim"):
        align_conversations([[{"role": "user", "content": "a < b"}]], real("qwen"), real("qwen"),
                            student_template=escaping, teacher_template=CHATML_TEMPLATE)  # fmt: skip
    dropping = CHATML_TEMPLATE.replace("{%- for message in messages %}",
                                       "{%- for message in messages if message['role'] != 'system' %}")  # fmt: skip
    with pytest.raises(ValueError, match=r"message 0 \(system\).*exactly once and in order"):
        align_conversations(CONVERSATIONS[:1], real("qwen"), real("qwen"), student_template=dropping,
                            teacher_template=CHATML_TEMPLATE)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Tokenizers trained here, as transformers tokenizers with their own templates


def adapter(kind: str):
    return load_tokenizer(chat_tokenizer(kind))


@pytest.mark.parametrize("student", ["llama3", "sentencepiece"])
def test_transformers_tokenizers_render_with_their_own_templates(student):
    batch = align_conversations(CONVERSATIONS, chat_tokenizer(student), chat_tokenizer("chatml"))
    check(CONVERSATIONS, batch, adapter(student), adapter("chatml"))
    end_of_turn = chat_tokenizer(student).eos_token_id
    labels_check(batch, adapter(student), CONVERSATIONS, end_of_turn)
    # The same templates given explicitly, with xtoken's own renderer (the tokenizer adapters carry the roles).
    template = {"llama3": LLAMA3_TEMPLATE, "sentencepiece": INST_TEMPLATE}[student]
    roles = {"llama3": {"eos": "<|eot_id|>"}, "sentencepiece": {}}[student]
    explicit = align_conversations(
        CONVERSATIONS, load_tokenizer(chat_tokenizer(student), roles=roles),
        load_tokenizer(chat_tokenizer("chatml")), student_template=template, teacher_template=CHATML_TEMPLATE,
    )  # fmt: skip
    assert torch.equal(explicit.chunks, batch.chunks)
    assert torch.equal(explicit.student_labels, batch.student_labels)


def test_sentencepiece_student_is_aligned_exactly_not_by_position():
    conversation = [
        {"role": "user", "content": "Numbers: 201 and 2024"}, {"role": "assistant", "content": "Café 201, 2024 😀"}
    ]
    batch = align_conversations([conversation], chat_tokenizer("sentencepiece"), chat_tokenizer("chatml"))
    check([conversation], batch, adapter("sentencepiece"), adapter("chatml"))
    words = tokens_of_chunks(batch, adapter("sentencepiece"), adapter("chatml"))
    # "▁Café" holds the template's space and the content's "Café"; the teacher's "Café" the content alone.
    assert words[0] == (["▁Café"], ["CafÃ©"])
    assert (["▁201"], ["Ġ", "2", "0", "1"]) in words and (["▁2024"], ["Ġ", "2", "0", "2", "4"]) in words


def test_end_of_turn_is_trained_when_pad_equals_eos():
    from transformers import PreTrainedTokenizerFast
    from tokenizers_util import digit_splitting_bpe

    student = PreTrainedTokenizerFast(tokenizer_object=digit_splitting_bpe(), chat_template=CHATML_TEMPLATE,
                                      eos_token="<|im_end|>", pad_token="<|im_end|>")  # fmt: skip
    batch = align_conversations(CONVERSATIONS, student, chat_tokenizer("llama3"))
    check(CONVERSATIONS, batch, load_tokenizer(student), adapter("llama3"))
    labels_check(batch, load_tokenizer(student), CONVERSATIONS, student.pad_token_id)
    assert (batch.student_labels[batch.student_attention_mask == 0] == -100).all()


def test_prompt_completion_trains_the_completion_only():
    example = {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Earlier answer 11."},
                   {"role": "user", "content": "Again"}],
        "completion": [{"role": "assistant", "content": "New answer 22."}],
    }  # fmt: skip
    batch = align_conversations([example], chat_tokenizer("llama3"), chat_tokenizer("chatml"))
    check([example], batch, adapter("llama3"), adapter("chatml"))
    assert stream(example, "assistant") == b"New answer 22."
    strings = {"prompt": "Hi", "completion": "Hello 33."}
    plain = align_conversations([strings], chat_tokenizer("llama3"), chat_tokenizer("chatml"))
    check([strings], plain, adapter("llama3"), adapter("chatml"))
    assert Conversation.parse(strings).messages[1] == {"role": "assistant", "content": "Hello 33."}


def test_a_message_boundary_is_never_crossed():
    # No text between the messages: the tokenizers read "Hello wor" + "ld again" as one word ("ld" never ends a
    # token of its own), so the chunk holding it would cross the boundary; it is dropped as empty_inside.
    bare = "{%- for message in messages %}{{- message['content'] }}{%- endfor %}"
    conversation = [{"role": "user", "content": "Hello wor"}, {"role": "assistant", "content": "ld again 2024"}]
    batch = align_conversations([conversation], chat_tokenizer("llama3"), chat_tokenizer("chatml"),
                                student_template=bare, teacher_template=bare, train_on="all")  # fmt: skip
    check([conversation], batch, adapter("llama3"), adapter("chatml"), train_on="all")
    assert batch.stats.student_dropped["empty_inside"] > 0 and batch.stats.teacher_dropped["empty_inside"] > 0
    assert batch.stats.chunks > 0


def test_collator_collates_conversations_like_align_conversations():
    student, teacher = chat_tokenizer("llama3"), chat_tokenizer("chatml")
    collator = DistillationCollator(student, [teacher], max_length=64)
    examples = [{"messages": c} for c in CONVERSATIONS]
    batch = pickle.loads(pickle.dumps(collator))(examples)
    expected = align_conversations(CONVERSATIONS, student, teacher, max_length=64)
    assert torch.equal(batch["labels"], expected.student_labels)
    assert torch.equal(batch["input_ids"], expected.student_input_ids)
    assert torch.equal(batch["teachers"][0]["chunks"], expected.chunks)
    assert torch.equal(batch["teachers"][0]["input_ids"], expected.teacher_input_ids)
    assert [c.messages for c in batch["conversations"]] == [tuple(c) for c in CONVERSATIONS]
    assert int(batch["teachers"][0]["chunk_stats"][:4].sum()) == expected.stats.chunks
    # A teacher with the student's tokenizer aligns 1:1.
    same = DistillationCollator(student, [None])(examples)["teachers"][0]
    assert int(same["chunk_stats"][0]) == int(same["chunk_stats"][:4].sum()) > 0


def test_bad_conversations_are_named():
    student, teacher = chat_tokenizer("llama3"), chat_tokenizer("chatml")
    with pytest.raises(TypeError, match=r"conversation 1, message 0 \(user\): 'content' must be a string"):
        parts = [{"role": "user", "content": [{"type": "text"}]}]
        align_conversations([CONVERSATIONS[0], parts], student, teacher)
    with pytest.raises(TypeError, match="conversation 0, message 0: expected a mapping with a 'role'"):
        align_conversations([[{"content": "no role"}]], student, teacher)
    with pytest.raises(ValueError, match="train_on"):
        align_conversations(CONVERSATIONS, student, teacher, train_on="user")
    with pytest.raises(ValueError, match="no chat template"):
        align_conversations(CONVERSATIONS, load_tokenizer(student), teacher)
    with pytest.raises(TypeError, match="sequence of conversations"):
        align_conversations(CONVERSATIONS[0][0], student, teacher)
    with pytest.raises(TypeError, match="chat template"):
        ChatTemplate(student, 42)


def test_cli_shows_both_renderings_with_the_template_tokens_marked(tmp_path, capsys):
    from xtoken.cli import main

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(CONVERSATIONS[0][1:3]), encoding="utf-8")
    student = tmp_path / "student"
    chat_tokenizer("llama3").save_pretrained(student)  # its template is saved with it
    assert main(["align", "--chat", str(chat), "--student", str(student), "--teacher", "qwen",
                 "--teacher-template", "chatml"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "  [<|begin_of_text|>] [<|start_header_id|>] [u] [s] [er] [<|end_header_id|>] [\\n\\n] [H] [ow]" in out
    assert "' birds' '.' [<|eot_id|>]\n" in out
    assert "[<|im_start|>] [user] [\\n] [How]" in out
    assert re.search(r"1:3\s+'201'\s+\| '2' '0' '1'", out)
    assert "empty_inside 0" in out
    assert main(["align", "--chat", str(chat), "--student", "qwen", "--teacher", "qwen"]) == 2
    assert "--student-template: 'qwen' has no saved chat template" in capsys.readouterr().err


def test_generated_completions_are_appended_as_sampled():
    # On-policy: the prompt is rendered with the generation prompt and the sampled text appended as it is, so a
    # template that trims contents (Llama-3's) never alters a completion.
    prompt = Conversation.parse(CONVERSATIONS[1][:1])
    generated = prompt.with_completion(" 2024 cats \n")
    batch = align_conversations([generated], chat_tokenizer("llama3"), chat_tokenizer("chatml"))
    check([generated.messages], batch, adapter("llama3"), adapter("chatml"))
    student = ChatTemplate(chat_tokenizer("llama3"))
    text = student.render(generated.prompt(), add_generation_prompt=True) + " 2024 cats \n"
    assert chat_tokenizer("llama3").decode(batch.student_input_ids[0]) == text
    assert [w for w in tokens_of_chunks(batch, adapter("llama3"), adapter("chatml"))][:2] == [
        (["Ġ"], ["Ġ"]), (["202"], ["2", "0", "2"]),
    ]
