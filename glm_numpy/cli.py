"""The ``glm-numpy`` command (also ``python -m glm_numpy.cli``).

    glm-numpy generate PROMPT        continue PROMPT, streaming; speeds on stderr at the end
    glm-numpy chat                   an interactive conversation (/clear, /history, /exit)
    glm-numpy inspect                config, every tensor, parameter count
    glm-numpy convert SRC DST        a checkpoint rewritten as safetensors (optionally re-typed)
    glm-numpy make-random-checkpoint DST   random weights in the official layout
    glm-numpy quantize SRC DST --bits 8|4   an int8/int4 copy (per row, or --group-size N)
    glm-numpy export-gguf SRC DST.gguf   one GGUF file for llama.cpp (--type f16|q8_0|q4_0)
    glm-numpy perplexity FILE        sliding-window perplexity of a text file
    glm-numpy check FILE.py          grade a student's exercise file (glm_numpy.exercises)
    glm-numpy diff --model A --model B PROMPT   where two models' runs first part, layer by layer
    glm-numpy lens PROMPT            the logit lens: each layer's top next tokens
    glm-numpy classroom init|report  nbgrader assignments and a class report (docs/teaching.md)
    glm-numpy serve                  an OpenAI-compatible server and chat page (glm_numpy.serve)
    glm-numpy warmup                 compile every kernel now (glm_numpy.warmup)

Model commands take --family chatglm2|chatglm3|codegeex2 when the directory does not show it
(glm_numpy.family); chat takes ChatGLM3's --system and --tools, generate CodeGeeX2's --language.

Each subcommand is a pair registered in COMMANDS: ``add_<name>_parser(subparsers)`` declares
its arguments and ``run_<name>(args) -> exit code`` does the work. Bad input of any kind is
reported as one line on stderr with exit code 2, never a traceback.

stdout carries the results (the generated text, tables) and stderr everything about the work:
progress bars, speeds, the first-run note, errors. When the reader of stdout goes away
(``glm-numpy inspect | head``) the command stops quietly with exit status 141, what a shell
reports for a program ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import glm_numpy.progress
from glm_numpy import chatglm3
from glm_numpy.checkpoint import CheckpointError
from glm_numpy.compute import COMPUTE_MODES
from glm_numpy.config import ChatGLM2Config, ConfigError
from glm_numpy.family import FAMILIES, detect_family, load_tokenizer
from glm_numpy.generation import (
    ChatSession,
    GenerationConfig,
    GenerationStats,
    decode_stream,
    generate_stream,
    process_response,
)
from glm_numpy.model import ChatGLM2
from glm_numpy.tokenizer import ChatGLM2Tokenizer, TokenizerError, build_prompt

USAGE_ERROR = 2
BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: as a shell reports a program ended by SIGPIPE
FIRST_RUN_NOTE = "glm-numpy: preparing kernels (first run only)…"


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and goes through main."""

    def error(self, message: str):
        raise CliError(message)


# ---------------------------------------------------------------------------- shared options
def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="model directory: config.json, checkpoint shards, tokenizer.model "
        "(default: the embedded default model)",
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="the model's family, when its directory does not show it (docs/family.md)",
    )
    parser.add_argument(
        "--compute",
        choices=COMPUTE_MODES,
        default="float32",
        help="arithmetic of 16-bit weights: float32 (exact products, the default) or bf16 "
        "(activations rounded to bfloat16, AVX512-BF16 dot products: faster prompts, "
        "about 3 significant digits; see docs/numerics.md)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    defaults = GenerationConfig()
    limit = "the context limit" if max_new_tokens is None else max_new_tokens
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help=f"at most N new tokens (default: {limit})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        metavar="T",
        help=f"> 0; below 1 sharpens, above 1 flattens (default: {defaults.temperature})",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=defaults.top_p,
        metavar="P",
        help=f"in (0, 1]: sample from the likeliest tokens of mass P (default: {defaults.top_p})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=defaults.top_k,
        metavar="K",
        help=f"sample from the K likeliest tokens; 0 turns it off (default: {defaults.top_k})",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=defaults.repetition_penalty,
        metavar="R",
        help="> 0; above 1 makes tokens already seen less likely (default: 1.0, off)",
    )
    parser.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr from the start, even when it is not a terminal",
    )
    shown.add_argument(
        "--quiet",
        action="store_true",
        help="no progress and no first-run note on stderr (errors are still shown)",
    )


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on stderr: by default when a person watches stderr, then only for work
    that takes over a second; with --progress always, from the start."""
    if args.progress:
        glm_numpy.progress.DELAY_SECONDS = 0.0
    return args.progress or (not args.quiet and sys.stderr.isatty())


def announce_first_run(args: argparse.Namespace) -> None:
    """Say once, on stderr, when this run compiles kernels (the first run after an install)."""
    if args.quiet:
        return
    from glm_numpy.kernels.compilation import on_first_compilation

    on_first_compilation(lambda: print(FIRST_RUN_NOTE, file=sys.stderr, flush=True))


def sampling_options(args: argparse.Namespace, config: ChatGLM2Config) -> dict:
    """The GenerationConfig fields the sampling arguments ask for (validated)."""
    options = {
        "do_sample": not args.greedy,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        # the official default 8192, but never past what the model was built for
        "max_length": min(GenerationConfig.max_length, config.seq_length),
    }
    try:
        GenerationConfig(**options)
    except ValueError as err:
        raise CliError(f"invalid sampling option: {err}") from None
    return options


def model_directory(given: str | None, needs_tokenizer: bool = True) -> Path:
    """--model (or the embedded default model) -> a directory checked for its files."""
    if given is None:
        try:
            from glm_numpy.assets import default_model_path
        except ImportError:
            raise CliError(
                "no --model DIR given, and the embedded default model is not installed "
                "(glm_numpy.assets.default_model_path is missing)"
            ) from None
        given = str(default_model_path())
    directory = Path(given)
    if not directory.is_dir():
        raise CliError(f"--model {directory}: not a directory")
    needed = ["config.json", "tokenizer.model"] if needs_tokenizer else ["config.json"]
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise CliError(f"--model {directory}: no {' and no '.join(missing)} in this directory")
    return directory


def open_tokenizer(
    directory: Path, config: ChatGLM2Config, family: str | None = None
) -> ChatGLM2Tokenizer:
    """The directory's tokenizer, with its family's behaviour (glm_numpy.family)."""
    tokenizer = load_tokenizer(directory, family)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise CliError(
            f"--model {directory}: tokenizer.model has {tokenizer.vocab_size} ids but the model "
            f"only {config.padded_vocab_size} embedding rows (padded_vocab_size)"
        )
    return tokenizer


def check_prompt_fits(
    ids: list[int], config: ChatGLM2Config, max_new_tokens: int | None = None
) -> None:
    if len(ids) >= config.seq_length:
        raise CliError(
            f"the prompt is {len(ids)} tokens, too long for this model's seq_length of "
            f"{config.seq_length} (room is needed for at least one new token)"
        )
    if max_new_tokens is not None and len(ids) + max_new_tokens > config.seq_length:
        raise CliError(
            f"the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} is "
            f"{len(ids) + max_new_tokens} tokens, beyond this model's seq_length of "
            f"{config.seq_length}"
        )


def print_growing(shown: str, text: str) -> str:
    """Print what `text` adds to the `shown` text of a stream; returns the new shown text."""
    print(text[len(shown) :], end="", flush=True)
    return text


# ---------------------------------------------------------------------------- generate
def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt, streaming the text")
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap PROMPT in the chat template ([Round 1] 问：PROMPT 答： for ChatGLM2, "
        "<|user|> PROMPT <|assistant|> for ChatGLM3) and tidy the reply",
    )
    parser.add_argument(
        "--language",
        metavar="LANG",
        help="CodeGeeX2: complete PROMPT as code in LANG (e.g. Python: '# language: Python')",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object at the end (text, token ids, counts, timings) instead of "
        "streaming the text",
    )
    add_model_argument(parser)
    add_sampling_arguments(parser, max_new_tokens=256)
    add_progress_arguments(parser)


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json", args.family)
    options = sampling_options(args, config)
    tokenizer = open_tokenizer(directory, config, args.family)
    ids = prompt_ids(args, directory, tokenizer)
    check_prompt_fits(ids, config, args.max_new_tokens)
    announce_first_run(args)
    started = time.perf_counter()
    model = ChatGLM2.from_pretrained(
        directory, family=args.family, progress=show_progress(args), compute=args.compute
    )
    load_seconds = time.perf_counter() - started

    generation = GenerationConfig(
        **options, vocab_limit=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids
    )
    stats = GenerationStats()
    tokens = generate_stream(model, ids, generation, stats=stats, progress=show_progress(args))
    if args.json:
        new_ids = list(tokens)
        reply = tokenizer.decode(new_ids)
        reply = tidy_reply(tokenizer, reply) if args.chat_template else reply
        print(json.dumps(generation_record(args.prompt, reply, ids, new_ids, stats, load_seconds)))
        return 0
    shown = ""
    for partial in decode_stream(tokenizer, tokens):
        shown = print_growing(
            shown, tidy_reply(tokenizer, partial) if args.chat_template else partial
        )
    print(flush=True)
    print(
        f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_seconds:.3f} s "
        f"({stats.prefill_tokens_per_second:.1f} tokens/s) · decode: {stats.decode_tokens} "
        f"tokens in {stats.decode_seconds:.3f} s ({stats.decode_tokens_per_second:.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def prompt_ids(args: argparse.Namespace, directory: Path, tokenizer) -> list[int]:
    """The ids `generate` feeds: the prompt as it is, in the chat template, or as CodeGeeX2 code."""
    if args.language is not None:
        from glm_numpy.codegeex2 import code_prompt

        if args.chat_template:
            raise CliError("--language (a code prompt) and --chat-template exclude each other")
        family = args.family or detect_family(directory)
        if family != "codegeex2":
            raise CliError(
                f"--language writes CodeGeeX2's code prompt; --model {directory} holds a "
                f"{family} model (pass --family codegeex2 if it is CodeGeeX2)"
            )
        try:
            return tokenizer.encode(code_prompt(args.prompt, args.language))
        except ValueError as err:
            raise CliError(str(err)) from None
    if not args.chat_template:
        return tokenizer.encode(args.prompt)
    if isinstance(tokenizer, chatglm3.ChatGLM3Tokenizer):
        return tokenizer.build_chat_input(args.prompt)
    return tokenizer.encode(build_prompt(args.prompt))


def tidy_reply(tokenizer, text: str) -> str:
    """A chat reply as the family's chat() shows it (a ChatGLM3 tool call as JSON)."""
    if not isinstance(tokenizer, chatglm3.ChatGLM3Tokenizer):
        return process_response(text)
    response, _ = chatglm3.process_response(text, [])
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)


def generation_record(
    prompt: str,
    text: str,
    prompt_ids: list[int],
    new_ids: list[int],
    stats: GenerationStats,
    load_seconds: float,
) -> dict:
    """What ``generate --json`` prints: one object for programs that call the command."""
    return {
        "prompt": prompt,
        "text": text,
        "prompt_token_ids": [int(i) for i in prompt_ids],
        "token_ids": [int(i) for i in new_ids],
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(new_ids),
        "stop_reason": stats.stop_reason,
        "timings": {
            "load_seconds": round(load_seconds, 6),
            "prefill_seconds": round(stats.prefill_seconds, 6),
            "decode_seconds": round(stats.decode_seconds, 6),
            "prefill_tokens_per_second": round(stats.prefill_tokens_per_second, 3),
            "decode_tokens_per_second": round(stats.decode_tokens_per_second, 3),
        },
    }


# ---------------------------------------------------------------------------- chat
CHAT_HELP = "Commands: /clear forgets the conversation, /history shows it, /exit (or Ctrl-D) quits."


def add_chat_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="an interactive conversation, streaming")
    add_model_argument(parser)
    parser.add_argument("--system", metavar="TEXT", help="ChatGLM3: the system prompt")
    parser.add_argument(
        "--tools",
        metavar="FILE.json",
        help="ChatGLM3: a JSON list of tool descriptions the model may call; you type each "
        "call's result",
    )
    add_sampling_arguments(parser, max_new_tokens=None)  # as the official chat: max_length only
    add_progress_arguments(parser)


def run_chat(args: argparse.Namespace) -> int:
    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json", args.family)
    options = sampling_options(args, config)
    tokenizer = open_tokenizer(directory, config, args.family)
    tools = read_tools(args.tools)
    if (args.system is not None or tools is not None) and not isinstance(
        tokenizer, chatglm3.ChatGLM3Tokenizer
    ):
        raise CliError("--system and --tools need a ChatGLM3 model (--family chatglm3)")
    announce_first_run(args)
    progress = show_progress(args)
    model = ChatGLM2.from_pretrained(
        directory, family=args.family, progress=progress, compute=args.compute
    )
    session = ChatSession(
        model, tokenizer, system=args.system, tools=tools, progress=progress, **options
    )
    print(f"glm-numpy chat with {directory}. {CHAT_HELP} Ctrl-C stops a reply.")
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh prompt, as in a shell
            print()
            continue
        if query == "/exit":
            return 0
        elif query == "/clear":
            session.clear()
            print("(conversation cleared)")
        elif query == "/history":
            show_history(session.history)
        elif query.startswith("/"):
            print(f"unknown command {query}. {CHAT_HELP}")
        elif query:
            call = reply_to(session, query)
            while call is not None:  # ChatGLM3 called a tool: the user answers for it
                try:
                    result = input("Observation (the tool's result): ").strip()
                except EOFError:
                    print()
                    return 0
                call = reply_to(session, result, role="observation")


def read_tools(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"--tools {path}: cannot read a JSON file ({err})") from None
    if not isinstance(tools, list):
        raise CliError(f"--tools {path}: expected a JSON list of tool descriptions")
    return tools


def reply_to(session: ChatSession, query: str, role: str = "user") -> dict | None:
    """Stream one reply; Ctrl-C stops the reply (it stays in the history as far as it got).

    Ctrl-C only raises a flag, checked between tokens: a KeyboardInterrupt raised inside a
    numba kernel's thread pool could leave the process unable to exit cleanly.
    Returns ChatGLM3's tool call {"name", "parameters"} when the reply is one, else None.
    """
    interrupted = threading.Event()
    # Before the prompt is shown: a Ctrl-C as soon as "ChatGLM: " appears stops the reply too.
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    reply, shown, call = session.stream(query, role), "", None
    try:
        print("ChatGLM: ", end="", flush=True)
        for partial in reply:
            if isinstance(partial, str):
                shown = print_growing(shown, partial)
            else:  # ChatGLM3 named a tool: shown once whole
                call = partial
            if interrupted.is_set():
                reply.close()
                print(" [interrupted]")
                return None
        if call is not None and "parameters" in call:
            print(f"[calls {call['name']}] {json.dumps(call['parameters'], ensure_ascii=False)}")
            return call
        if call is not None:  # metadata but no tools offered: shown with its text
            print(f"[{call['name']}] {call['content']}", end="")
        print()
        return None
    except ValueError as err:  # no longer fits in max_length, or an unreadable tool call
        print()
        print(f"glm-numpy: {err}; /clear to start a new conversation", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def show_history(history: list) -> None:
    if not history:
        print("(no history)")
    labels = {"system": "System", "user": "User", "assistant": "ChatGLM", "observation": "Tool"}
    round_number = 0
    for entry in history:
        if isinstance(entry, dict):  # a ChatGLM3 message
            metadata = entry.get("metadata", "").strip()
            label = labels.get(entry["role"], entry["role"]) + (
                f" [{metadata}]" if metadata else ""
            )
            tools = f" (+ {len(entry['tools'])} tools)" if "tools" in entry else ""
            print(f"{label}: {entry['content']}{tools}")
        else:
            round_number += 1
            print(f"[Round {round_number}]\nUser: {entry[0]}\nChatGLM: {entry[1]}")


# ---------------------------------------------------------------------------- inspect
def add_inspect_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="config, every tensor, parameter count")
    add_model_argument(parser)


def run_inspect(args: argparse.Namespace) -> int:
    from glm_numpy.checkpoint import load_checkpoint
    from glm_numpy.dtypes import dtype_name

    directory = model_directory(args.model, needs_tokenizer=False)
    config = ChatGLM2Config.from_json(directory / "config.json", args.family)
    checkpoint = load_checkpoint(directory)
    print(f"{directory / 'config.json'}")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    width = max(len(name) for name in checkpoint)
    print(f"\n{'tensor':<{width}}  {'shape':<16} {'dtype':<9} {'bytes':>14}")
    for name, array in checkpoint.items():
        shape = "[" + ", ".join(map(str, array.shape)) + "]"
        print(f"{name:<{width}}  {shape:<16} {dtype_name(array.dtype):<9} {array.nbytes:>14,}")
    print(
        f"\n{len(checkpoint)} tensors, {parameter_count(checkpoint, config):,} parameters, "
        f"{checkpoint.nbytes:,} bytes"
    )
    return 0


def parameter_count(checkpoint, config: ChatGLM2Config) -> int:
    """Stored elements, with a 4-bit quantised weight counting two per byte (spec §6)."""
    total = 0
    for name, array in checkpoint.items():
        packed = config.quantization_bit == 4 and f"{name}_scale" in checkpoint
        total += array.size * (2 if packed else 1)
    return total


# ---------------------------------------------------------------------------- checkpoints
def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="rewrite a checkpoint as safetensors shards")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory or file")
    parser.add_argument("dst", metavar="DST", help="new directory (must not exist)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)


def run_convert(args: argparse.Namespace) -> int:
    from glm_numpy.checkpoint.convert import convert_checkpoint

    print(convert_checkpoint(args.src, args.dst, dtype=args.dtype, progress=True))
    return 0


def add_make_random_checkpoint_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-random-checkpoint", help="random weights in the official layout (for benchmarks)"
    )
    parser.add_argument("dst", metavar="DST", help="new directory (must not exist)")
    parser.add_argument("--size", choices=["6b", "tiny"], default="6b")
    parser.add_argument("--format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--seed", type=int, default=0)


def run_make_random_checkpoint(args: argparse.Namespace) -> int:
    from glm_numpy.checkpoint.convert import make_random_checkpoint

    path = make_random_checkpoint(
        args.dst, size=args.size, fmt=args.format, dtype=args.dtype, seed=args.seed
    )
    print(path)
    return 0


# ---------------------------------------------------------------------------- quantisation
def add_quantize_parser(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="an int8/int4 copy of a checkpoint")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory (16- or 32-bit)")
    parser.add_argument("dst", metavar="DST", help="new directory (must not exist)")
    parser.add_argument("--bits", type=int, choices=[8, 4], required=True)
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help="one scale per N input columns (e.g. 64 or 128); default: one per row (official)",
    )
    parser.add_argument(
        "--quantize-output-layer",
        action="store_true",
        help="quantise the output layer too (the official scheme keeps it 16-bit)",
    )


def run_quantize(args: argparse.Namespace) -> int:
    from glm_numpy.checkpoint.quantize import quantize_checkpoint

    try:
        path = quantize_checkpoint(
            args.src, args.dst, args.bits, args.group_size, args.quantize_output_layer
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    print(path)
    return 0


# ---------------------------------------------------------------------------- GGUF export
def add_export_gguf_parser(subparsers) -> None:
    parser = subparsers.add_parser("export-gguf", help="one GGUF file for llama.cpp")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory (16- or 32-bit)")
    parser.add_argument("dst", metavar="DST.gguf", help="new file (must not exist)")
    parser.add_argument("--type", choices=["f16", "q8_0", "q4_0"], default="f16")
    parser.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.model (default: the one in SRC)"
    )


def run_export_gguf(args: argparse.Namespace) -> int:
    try:
        from glm_numpy.export import write_gguf
    except ImportError as err:
        raise CliError(f"export-gguf needs the gguf package: pip install gguf ({err})") from None
    print(write_gguf(args.src, args.dst, args.type, tokenizer=args.tokenizer))
    return 0


def add_perplexity_parser(subparsers) -> None:
    parser = subparsers.add_parser("perplexity", help="sliding-window perplexity of a text file")
    parser.add_argument("file", metavar="FILE", help="UTF-8 text")
    add_model_argument(parser)
    parser.add_argument("--window", type=int, default=512, metavar="N", help="tokens per pass")
    parser.add_argument(
        "--stride", type=int, default=256, metavar="N", help="tokens between window starts"
    )
    add_progress_arguments(parser)


def run_perplexity(args: argparse.Namespace) -> int:
    from glm_numpy.perplexity import perplexity

    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json", args.family)
    if not 1 <= args.stride <= args.window <= config.seq_length:
        raise CliError(
            f"need 1 <= --stride ({args.stride}) <= --window ({args.window}) <= the model's "
            f"seq_length ({config.seq_length})"
        )
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"{args.file}: cannot read as UTF-8 text ({err})") from None
    ids = open_tokenizer(directory, config, args.family).encode(text)
    if len(ids) < 2:
        raise CliError(f"{args.file}: too short to score (fewer than 2 tokens)")
    announce_first_run(args)
    progress = show_progress(args)
    model = ChatGLM2.from_pretrained(
        directory, family=args.family, progress=progress, compute=args.compute
    )
    result = perplexity(model, ids, args.window, args.stride, progress=progress)
    print(
        f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.4f} nats) over "
        f"{result.scored_tokens} tokens of {args.file}; window {result.window}, "
        f"stride {result.stride}"
    )
    return 0


# ---------------------------------------------------------------------------- check
def add_check_parser(subparsers) -> None:
    from glm_numpy.exercises import EXERCISE_NAMES

    parser = subparsers.add_parser(
        "check",
        help="grade a student's exercise file",
        description="Grade FILE.py, which defines the exercise functions by name: "
        f"{', '.join(EXERCISE_NAMES)}. Exit code 1 if any fails.",
    )
    parser.add_argument("file", metavar="FILE.py", nargs="+", help="one file per student")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON (per file and exercise: passed, cases, likely bug, "
        "mistake) for a class report",
    )
    parser.add_argument(
        "--exercise",
        action="append",
        choices=EXERCISE_NAMES,
        metavar="NAME",
        help="grade only this exercise (repeatable; default: all)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=5.0, metavar="SECONDS", help="per case (default 5)"
    )


def run_check(args: argparse.Namespace) -> int:
    import json

    from glm_numpy.classroom.report import result_record
    from glm_numpy.exercises import grade_file

    missing = [name for name in args.file if not Path(name).is_file()]
    if missing:
        raise CliError(f"{missing[0]}: no such file to grade")
    reports = [grade_file(name, args.exercise, time_limit=args.time_limit) for name in args.file]
    if args.json:
        files = [
            {
                "file": str(r.path),
                "passed": r.passed,
                "exercises": list(map(result_record, r.results)),
            }
            for r in reports
        ]
        print(json.dumps(files, indent=1, ensure_ascii=False))
    else:
        print("\n\n".join(report.format() for report in reports))
    return 0 if all(report.passed for report in reports) else 1


# ---------------------------------------------------------------------------- classroom
def add_classroom_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "classroom",
        help="nbgrader assignments from the exercises, and a class report",
        description="A teacher's guide: docs/teaching.md.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="write an nbgrader course: one assignment per part")
    init.add_argument("course_dir", metavar="COURSE_DIR")
    init.add_argument("--course-id", default="glm-numpy", help="nbgrader's course id")
    report = actions.add_parser("report", help="points, diagnoses, most common mistakes")
    report.add_argument("course_dir", metavar="COURSE_DIR")
    report.add_argument("assignments", metavar="ASSIGNMENT", nargs="+")
    report.add_argument(
        "--output", metavar="DIR", help="where to write .md, .json, .png (COURSE_DIR/reports)"
    )


def run_classroom(args: argparse.Namespace) -> int:
    from glm_numpy.classroom.course import ASSIGNMENTS, write_course

    if args.action == "init":
        try:
            written = write_course(args.course_dir, args.course_id)
        except OSError as err:
            raise CliError(str(err)) from None
        for path in written:
            print(path)
        print(
            f"assignments: {', '.join(ASSIGNMENTS)}; next: cd {args.course_dir} && "
            "nbgrader generate_assignment ASSIGNMENT"
        )
        return 0
    from glm_numpy.classroom.report import class_report

    try:
        report = class_report(args.course_dir, args.assignments)
        written = report.write(args.output or Path(args.course_dir) / "reports")
    except (OSError, KeyError, ImportError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        raise CliError(message) from None
    print(report.markdown())
    for path in written:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------- diff and lens
SHAPE_FIELDS = (
    "num_layers",
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "multi_query_group_num",
)


def add_diff_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="where two models' runs on a prompt first differ (e.g. fp16 vs int4), per layer",
    )
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument(
        "--model", action="append", metavar="DIR", help="twice: the reference A, then B"
    )
    parser.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.model (default: the one beside A or B)"
    )
    parser.add_argument("--rtol", type=float, default=1e-3, help="(default: 1e-3)")
    parser.add_argument("--atol", type=float, default=1e-5, help="(default: 1e-5)")


def run_diff(args: argparse.Namespace) -> int:
    from glm_numpy.interpret import first_divergence, format_layer_errors, layer_errors

    if not args.model or len(args.model) != 2:
        raise CliError("diff needs exactly two models: --model A --model B")
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    directories = [model_directory(given, needs_tokenizer=False) for given in args.model]
    configs = [ChatGLM2Config.from_json(d / "config.json") for d in directories]
    for field in SHAPE_FIELDS:
        a, b = (getattr(c, field) for c in configs)
        if a != b:
            raise CliError(
                f"the models differ in {field} ({a} vs {b}): their runs cannot be compared"
            )
    tokenizer_file = args.tokenizer or next(
        (str(d / "tokenizer.model") for d in directories if (d / "tokenizer.model").is_file()),
        None,
    )
    if tokenizer_file is None:
        raise CliError("neither model directory holds a tokenizer.model: give --tokenizer FILE")
    tokenizer = ChatGLM2Tokenizer(tokenizer_file)
    ids = tokenizer.encode(args.prompt)
    check_prompt_fits(ids, configs[0])
    traces = []
    for directory in directories:
        _, trace = ChatGLM2.from_pretrained(directory).forward(ids, trace=True)
        traces.append(trace)
    print(f"A: {directories[0]}\nB: {directories[1]}\nprompt: {len(ids)} tokens")
    divergence = first_divergence(*traces, rtol=args.rtol, atol=args.atol)
    if divergence is None:
        print(f"no divergence beyond rtol={args.rtol:g}, atol={args.atol:g}")
        print(format_layer_errors(layer_errors(*traces)))
    else:
        print(divergence)
    return 0


def add_lens_parser(subparsers) -> None:
    parser = subparsers.add_parser("lens", help="the logit lens: each layer's top next tokens")
    parser.add_argument("prompt", metavar="PROMPT")
    add_model_argument(parser)
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="(default: 5)")
    parser.add_argument(
        "--position", type=int, default=-1, metavar="N", help="which token (default: the last)"
    )


def run_lens(args: argparse.Namespace) -> int:
    from glm_numpy.interpret import logit_lens

    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    if args.top_k < 1:
        raise CliError(f"--top-k {args.top_k}: must be >= 1")
    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json")
    tokenizer = open_tokenizer(directory, config)
    ids = tokenizer.encode(args.prompt)
    check_prompt_fits(ids, config)
    if not -len(ids) <= args.position < len(ids):
        raise CliError(f"--position {args.position}: the prompt has {len(ids)} tokens")
    model = ChatGLM2.from_pretrained(directory, compute=args.compute)
    lens = logit_lens(model, tokenizer, args.prompt, args.top_k)
    print(lens.format(args.position))
    return 0


# ---------------------------------------------------------------------------- warmup
def add_warmup_parser(subparsers) -> None:
    subparsers.add_parser(
        "warmup",
        help="compile and cache every kernel now, so no later command waits for it",
        description="Run the embedded default model once in each weight format (float16, "
        "bfloat16, int8, int4), so that numba compiles every kernel into its on-disk cache. "
        "Worth doing once after installing (later runs load the cache in well under a second).",
    )


def run_warmup(args: argparse.Namespace) -> int:
    from glm_numpy.warmup import warmup

    warmup()
    return 0


# ---------------------------------------------------------------------------- serve
def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching and a chat page"
    )
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost)")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="requests decoded together (default 8)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a batch slot; beyond them, 429 (default 64)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=128,
        metavar="N",
        help="prompt tokens read between two decode steps (default 128)",
    )
    parser.add_argument(
        "--prompt-cache-mb",
        type=int,
        default=1024,
        metavar="MB",
        help="KV caches of finished conversations kept for their next round (default 1024)",
    )


def run_serve(args: argparse.Namespace) -> int:
    import socket

    try:
        from glm_numpy.serve import serve
    except ImportError as err:
        raise CliError(
            f"glm-numpy serve needs the serve extra ({err}): pip install 'glm-numpy[serve]'"
        ) from None
    for flag, value, low in [
        ("--port", args.port, 0),
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 0),
        ("--prefill-chunk", args.prefill_chunk, 1),
        ("--prompt-cache-mb", args.prompt_cache_mb, 0),
    ]:
        if value < low or (flag == "--port" and value > 65535):
            raise CliError(f"{flag} {value}: out of range")
    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json", args.family)
    tokenizer = open_tokenizer(directory, config, args.family)  # ChatGLM3's: its roles and tools
    try:  # a clear error now rather than a server that loads the model and then cannot bind
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        raise CliError(
            f"cannot listen on {args.host}:{args.port} ({err.strerror or err})"
        ) from None
    serve(
        ChatGLM2.from_pretrained(directory, family=args.family, compute=args.compute),
        tokenizer,
        model_id=directory.resolve().name,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prompt_cache_bytes=args.prompt_cache_mb << 20,
    )
    return 0


# ---------------------------------------------------------------------------- main
Command = tuple[Callable[[object], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "generate": (add_generate_parser, run_generate),
    "chat": (add_chat_parser, run_chat),
    "inspect": (add_inspect_parser, run_inspect),
    "convert": (add_convert_parser, run_convert),
    "make-random-checkpoint": (add_make_random_checkpoint_parser, run_make_random_checkpoint),
    "quantize": (add_quantize_parser, run_quantize),
    "export-gguf": (add_export_gguf_parser, run_export_gguf),
    "perplexity": (add_perplexity_parser, run_perplexity),
    "check": (add_check_parser, run_check),
    "diff": (add_diff_parser, run_diff),
    "lens": (add_lens_parser, run_lens),
    "warmup": (add_warmup_parser, run_warmup),
    "classroom": (add_classroom_parser, run_classroom),
    "serve": (add_serve_parser, run_serve),
}


def build_parser() -> Parser:
    parser = Parser(prog="glm-numpy", description="ChatGLM2-6B in NumPy.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_parser, run) in COMMANDS.items():
        add_parser(subparsers)
        subparsers.choices[name].set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (CliError, ConfigError, CheckpointError, TokenizerError) as err:
        one_line = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"glm-numpy: error: {one_line}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return stop_writing_to_closed_pipe()


def stop_writing_to_closed_pipe() -> int:
    """The reader of stdout went away (``| head``): end quietly with exit status 141.

    Whatever is still buffered for stdout is dropped instead of raising BrokenPipeError a second
    time when Python flushes stdout at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
