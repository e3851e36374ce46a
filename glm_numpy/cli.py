"""The ``glm-numpy`` command (also ``python -m glm_numpy.cli``).

    glm-numpy generate PROMPT        continue PROMPT, streaming; speeds on stderr at the end
    glm-numpy chat                   an interactive conversation (/clear, /history, /exit)
    glm-numpy inspect                config, every tensor, parameter count
    glm-numpy convert SRC DST        a checkpoint rewritten as safetensors (optionally re-typed)
    glm-numpy make-random-checkpoint DST   random weights in the official layout
    glm-numpy quantize SRC DST --bits 8|4   an int8/int4 copy (per row, or --group-size N)
    glm-numpy perplexity FILE        sliding-window perplexity of a text file
    glm-numpy check FILE.py          grade a student's exercise file (glm_numpy.exercises)

Each subcommand is a pair registered in COMMANDS: ``add_<name>_parser(subparsers)`` declares
its arguments and ``run_<name>(args) -> exit code`` does the work. Bad input of any kind is
reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from glm_numpy.checkpoint import CheckpointError
from glm_numpy.compute import COMPUTE_MODES
from glm_numpy.config import ChatGLM2Config, ConfigError
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


def open_tokenizer(directory: Path, config: ChatGLM2Config) -> ChatGLM2Tokenizer:
    tokenizer = ChatGLM2Tokenizer.from_pretrained(directory)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise CliError(
            f"--model {directory}: tokenizer.model has {tokenizer.vocab_size} ids but the model "
            f"only {config.padded_vocab_size} embedding rows (padded_vocab_size)"
        )
    return tokenizer


def check_prompt_fits(ids: list[int], config: ChatGLM2Config) -> None:
    if len(ids) >= config.seq_length:
        raise CliError(
            f"the prompt is {len(ids)} tokens, too long for this model's seq_length of "
            f"{config.seq_length} (room is needed for at least one new token)"
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
        help="wrap PROMPT in the chat template ([Round 1] 问：PROMPT 答：) and tidy the reply",
    )
    add_model_argument(parser)
    add_sampling_arguments(parser, max_new_tokens=256)


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json")
    options = sampling_options(args, config)
    tokenizer = open_tokenizer(directory, config)
    text = build_prompt(args.prompt) if args.chat_template else args.prompt
    ids = tokenizer.encode(text)
    check_prompt_fits(ids, config)
    model = ChatGLM2.from_pretrained(directory, compute=args.compute)

    generation = GenerationConfig(**options, vocab_limit=tokenizer.vocab_size)
    stats = GenerationStats()
    shown = ""
    for partial in decode_stream(tokenizer, generate_stream(model, ids, generation, stats=stats)):
        shown = print_growing(shown, process_response(partial) if args.chat_template else partial)
    print(flush=True)
    print(
        f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_seconds:.3f} s "
        f"({stats.prefill_tokens_per_second:.1f} tokens/s) · decode: {stats.decode_tokens} "
        f"tokens in {stats.decode_seconds:.3f} s ({stats.decode_tokens_per_second:.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------------------- chat
CHAT_HELP = "Commands: /clear forgets the conversation, /history shows it, /exit (or Ctrl-D) quits."


def add_chat_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="an interactive conversation, streaming")
    add_model_argument(parser)
    add_sampling_arguments(parser, max_new_tokens=None)  # as the official chat: max_length only


def run_chat(args: argparse.Namespace) -> int:
    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json")
    options = sampling_options(args, config)
    tokenizer = open_tokenizer(directory, config)
    session = ChatSession(
        ChatGLM2.from_pretrained(directory, compute=args.compute), tokenizer, **options
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
            reply_to(session, query)


def reply_to(session: ChatSession, query: str) -> None:
    """Stream one reply; Ctrl-C stops the reply (it stays in the history as far as it got).

    Ctrl-C only raises a flag, checked between tokens: a KeyboardInterrupt raised inside a
    numba kernel's thread pool could leave the process unable to exit cleanly.
    """
    interrupted = threading.Event()
    # Before the prompt is shown: a Ctrl-C as soon as "ChatGLM: " appears stops the reply too.
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    reply, shown = session.stream(query), ""
    try:
        print("ChatGLM: ", end="", flush=True)
        for partial in reply:
            shown = print_growing(shown, partial)
            if interrupted.is_set():
                reply.close()
                print(" [interrupted]")
                return
        print()
    except ValueError as err:  # the conversation no longer fits in max_length
        print()
        print(f"glm-numpy: {err}; /clear to start a new conversation", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def show_history(history: list[tuple[str, str]]) -> None:
    if not history:
        print("(no history)")
    for i, (query, response) in enumerate(history, start=1):
        print(f"[Round {i}]\nUser: {query}\nChatGLM: {response}")


# ---------------------------------------------------------------------------- inspect
def add_inspect_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="config, every tensor, parameter count")
    add_model_argument(parser)


def run_inspect(args: argparse.Namespace) -> int:
    from glm_numpy.checkpoint import load_checkpoint
    from glm_numpy.dtypes import dtype_name

    directory = model_directory(args.model, needs_tokenizer=False)
    config = ChatGLM2Config.from_json(directory / "config.json")
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
    from glm_numpy.quantize import quantize_checkpoint

    try:
        path = quantize_checkpoint(
            args.src, args.dst, args.bits, args.group_size, args.quantize_output_layer
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    print(path)
    return 0


def add_perplexity_parser(subparsers) -> None:
    parser = subparsers.add_parser("perplexity", help="sliding-window perplexity of a text file")
    parser.add_argument("file", metavar="FILE", help="UTF-8 text")
    add_model_argument(parser)
    parser.add_argument("--window", type=int, default=512, metavar="N", help="tokens per pass")
    parser.add_argument(
        "--stride", type=int, default=256, metavar="N", help="tokens between window starts"
    )


def run_perplexity(args: argparse.Namespace) -> int:
    from glm_numpy.perplexity import perplexity

    directory = model_directory(args.model)
    config = ChatGLM2Config.from_json(directory / "config.json")
    if not 1 <= args.stride <= args.window <= config.seq_length:
        raise CliError(
            f"need 1 <= --stride ({args.stride}) <= --window ({args.window}) <= the model's "
            f"seq_length ({config.seq_length})"
        )
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"{args.file}: cannot read as UTF-8 text ({err})") from None
    ids = open_tokenizer(directory, config).encode(text)
    if len(ids) < 2:
        raise CliError(f"{args.file}: too short to score (fewer than 2 tokens)")
    result = perplexity(
        ChatGLM2.from_pretrained(directory, compute=args.compute), ids, args.window, args.stride
    )
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
    parser.add_argument("file", metavar="FILE.py")
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
    from glm_numpy.exercises import grade_file

    try:
        report = grade_file(args.file, args.exercise, time_limit=args.time_limit)
    except FileNotFoundError as err:
        raise CliError(str(err)) from None
    print(report.format())
    return 0 if report.passed else 1


# ---------------------------------------------------------------------------- main
Command = tuple[Callable[[object], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "generate": (add_generate_parser, run_generate),
    "chat": (add_chat_parser, run_chat),
    "inspect": (add_inspect_parser, run_inspect),
    "convert": (add_convert_parser, run_convert),
    "make-random-checkpoint": (add_make_random_checkpoint_parser, run_make_random_checkpoint),
    "quantize": (add_quantize_parser, run_quantize),
    "perplexity": (add_perplexity_parser, run_perplexity),
    "check": (add_check_parser, run_check),
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


if __name__ == "__main__":
    sys.exit(main())
