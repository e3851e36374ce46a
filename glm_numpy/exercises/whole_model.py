"""A student's layers inside the whole model: does it still talk?

    from glm_numpy.exercises import run_with
    run_with({"rotary": my_rotary, "rms_norm": my_rms_norm}, "床前明月光")

runs the embedded default model twice: as it is, and with the student's functions computing
their parts. Each student function (the exercise signatures, glm_numpy.exercises.EXERCISES)
replaces the hook point it computes, from the intermediates the same pass has already produced
(glm_numpy.hooks), so the model's own forward pass runs around it. The report names the first
intermediate where the two runs part (glm_numpy.interpret.first_divergence, on the prompt's pass
and on one decode step over the KV cache) and shows the two generations side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import unicodedata
from collections.abc import Callable, Mapping

import numpy as np

from glm_numpy import generation
from glm_numpy.dtypes import to_float32
from glm_numpy.exercises.cases import BLOCK_WEIGHT_NAMES
from glm_numpy.interpret import Divergence, first_divergence

HOOKED_EXERCISES = (  # in the order their hooks run within a pass
    "embedding",
    "rms_norm",
    "rotary",
    "attention",
    "kv_cache_step",
    "swiglu",
    "block",
    "lm_head",
    "top_p",
)


class StudentError(Exception):
    """A student's function raised, or its output could not be used."""


class StudentRun:
    """One sequence run with student functions: the hooks, and what they need across passes
    (the tokens fed so far, the KV cache, each layer's inputs for a student's block)."""

    def __init__(self, model, functions: Mapping[str, Callable]):
        self.model, self.config = model, model.config
        self.functions = {name: _reporting(name, fn) for name, fn in functions.items()}
        self.sequence: list[int] = []  # every token fed so far
        self.cache = model.new_cache()
        self.seen: dict[str, np.ndarray] = {}  # this pass's intermediates the hooks need
        self.block_inputs: dict[int, np.ndarray] = {}  # layer -> [S, D] every input so far
        self._chains: dict[str, list[Callable]] = {}
        # Always one hook, even with no student function: the reference run then takes the
        # same (readable) path through the layers as the student's, and computes alike.
        self._watch("positions")
        for name in HOOKED_EXERCISES:
            if name in self.functions and name != "top_p":
                getattr(self, f"_hook_{name}")(self.functions[name])
        self.hooks = {point: _chained(fns) for point, fns in self._chains.items()}

    # --------------------------------------------------------------- hook plumbing
    def _watch(self, point: str) -> None:
        self._add(point, lambda array: self.seen.__setitem__(point, array))

    def _add(self, point: str, fn: Callable) -> None:
        self._chains.setdefault(point, []).append(fn)

    def _weight(self, name: str) -> np.ndarray:
        return to_float32(self.model.weights[name])

    def _layer(self, i: int, tensor: str) -> np.ndarray:
        return self._weight(f"transformer.encoder.layers.{i}.{tensor}")

    # --------------------------------------------------------------- one per exercise
    def _hook_embedding(self, embedding) -> None:
        table = self._weight("transformer.embedding.word_embeddings.weight")
        ids = lambda: np.asarray(self.sequence)[self.seen["positions"]]  # noqa: E731
        self._add("embedding", lambda _: embedding(ids(), table))

    def _hook_rms_norm(self, rms_norm) -> None:
        eps = self.config.layernorm_epsilon
        for i in range(self.config.num_layers):
            for source, point, tensor in (
                ("input", "input_layernorm", "input_layernorm.weight"),
                (
                    "residual_attention",
                    "post_attention_layernorm",
                    "post_attention_layernorm.weight",
                ),
            ):
                source, weight = f"layers.{i}.{source}", self._layer(i, tensor)
                self._watch(source)
                self._add(f"layers.{i}.{point}", self._computing(rms_norm, source, weight, eps))
        last = f"layers.{self.config.num_layers - 1}.output"
        final = self._weight("transformer.encoder.final_layernorm.weight")
        self._watch(last)
        self._add("final_layernorm", self._computing(rms_norm, last, final, eps))

    def _hook_rotary(self, rotary) -> None:
        for i in range(self.config.num_layers):
            for part in ("q", "k"):
                source = f"layers.{i}.attention.{part}"
                self._watch(source)
                self._add(
                    f"{source}_rotary",
                    lambda _, s=source: rotary(self.seen[s], self.seen["positions"]),
                )

    def _hook_attention(self, attention) -> None:
        for i in range(self.config.num_layers):
            q = f"layers.{i}.attention.q_rotary"
            self._watch(q)

            def context(array, i=i, q=q):
                out = attention(self.seen[q], self.cache.keys(i), self.cache.values(i))
                return np.reshape(out, array.shape)  # [T, H, Dh] -> [T, H·Dh]

            self._add(f"layers.{i}.attention.context", context)

    def _hook_kv_cache_step(self, kv_cache_step) -> None:
        """Decode steps only (one new token): the student's step attends and extends the cache,
        and the model goes on with the student's cache."""
        for i in range(self.config.num_layers):
            for part in "qkv":
                self._watch(f"layers.{i}.attention.{part}")

            def context(array, i=i):
                if array.shape[0] != 1 or self.cache.length < 2:
                    return None  # the prompt's pass: not a decode step
                q, k, v = (self.seen[f"layers.{i}.attention.{p}"] for p in "qkv")
                old_k, old_v = self.cache.keys(i)[:-1].copy(), self.cache.values(i)[:-1].copy()
                out, new_k, new_v = kv_cache_step(q, k, v, old_k, old_v)
                self.cache.store(i, slice(0, self.cache.length), new_k, new_v)
                return np.reshape(out, array.shape)

            self._add(f"layers.{i}.attention.context", context)

    def _hook_swiglu(self, swiglu) -> None:
        for i in range(self.config.num_layers):
            source = f"layers.{i}.post_attention_layernorm"
            weights = (
                self._layer(i, "mlp.dense_h_to_4h.weight"),
                self._layer(i, "mlp.dense_4h_to_h.weight"),
            )
            self._watch(source)
            self._add(f"layers.{i}.mlp_output", self._computing(swiglu, source, *weights))

    def _hook_block(self, block) -> None:
        """The student's block has no cache: it gets every input of its layer so far, and the
        rows of the new tokens are kept."""
        c = self.config
        for i in range(c.num_layers):
            weights = {name: self._layer(i, name) for name in BLOCK_WEIGHT_NAMES}

            def remember(x, i=i):
                earlier = self.block_inputs.get(i, x[:0])
                self.block_inputs[i] = np.concatenate([earlier, x])

            def output(array, i=i, weights=weights):
                inputs = self.block_inputs[i]  # [S, D]
                positions = np.arange(len(inputs))
                H, G = c.num_attention_heads, c.num_kv_groups
                out = block(inputs, positions, weights, H, G, c.layernorm_epsilon)
                return np.asarray(out)[-len(array) :]

            self._add(f"layers.{i}.input", remember)
            self._add(f"layers.{i}.output", output)

    def _hook_lm_head(self, lm_head) -> None:
        weight = self._weight("transformer.output_layer.weight")
        self._watch("final_layernorm")
        # with last_only the logits hold the last row only: give the student those rows
        self._add(
            "logits", lambda array: lm_head(self.seen["final_layernorm"][-len(array) :], weight)
        )

    def _computing(self, fn, source: str, *arguments):
        """A hook that replaces its point by fn(what `source` held in this pass, *arguments)."""
        return lambda _: fn(self.seen[source], *arguments)

    # --------------------------------------------------------------- runs
    def forward(self, ids: list[int], trace: bool = False):
        self.sequence += ids
        return self.model.forward(np.array(ids), cache=self.cache, trace=trace, hooks=self.hooks)

    def generate(self, prompt_ids: list[int], config: generation.GenerationConfig) -> list[int]:
        self.sequence += prompt_ids
        new = []
        with self._sampling():
            for token in generation.generate_stream(
                self.model, prompt_ids, config, self.cache, hooks=self.hooks
            ):
                self.sequence.append(token)  # fed on the next step: the embedding hook reads it
                new.append(token)
        return new

    @contextlib.contextmanager
    def _sampling(self):
        """The student's top_p in place of the package's filter, for this run only."""
        if "top_p" not in self.functions:
            yield
            return
        top_p, package_filter = self.functions["top_p"], generation.top_p_filter

        def top_p_filter(logits, p):
            kept = np.zeros(logits.shape, dtype=bool)
            kept[[int(i) for i in top_p(logits, p)]] = True
            return np.where(kept, logits, -np.inf)

        generation.top_p_filter = top_p_filter
        try:
            yield
        finally:
            generation.top_p_filter = package_filter


def _reporting(name: str, fn: Callable) -> Callable:
    def call(*args):
        try:
            return fn(*args)
        except Exception as err:
            message = f": {err}" if str(err) else ""
            raise StudentError(f"your {name} raised {type(err).__name__}{message}") from err

    return call


def _chained(fns: list[Callable]) -> Callable:
    """Several hooks at one point, one after the other (each sees the previous one's result)."""

    def hook(array):
        for fn in fns:
            replacement = fn(array)
            array = array if replacement is None else np.asarray(replacement, dtype=array.dtype)
        return array

    return hook


# ---------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True, repr=False)
class WholeModelRun:
    functions: list[str]
    prompt: str
    divergence: Divergence | None  # first divergence (prompt pass, else the decode step)
    divergence_in: str  # "the prompt's pass" or "a decode step (with the KV cache)"
    reference: str  # the default model's generation
    yours: str  # the generation with the student's functions ("" when they failed)
    error: str | None = None  # what stopped the run with the student's functions

    @property
    def same_text(self) -> bool:
        return self.error is None and self.reference == self.yours

    def __repr__(self) -> str:
        lines = [
            f"The default model with your {', '.join(self.functions)}, prompt {self.prompt!r}:"
        ]
        if self.error:
            lines.append(f"the run with your functions stopped: {self.error}")
        elif self.divergence is None:
            lines.append(
                "no divergence: every intermediate matches the reference "
                "(the prompt's pass and a decode step over the KV cache)"
            )
        else:
            lines.append(f"in {self.divergence_in}, {self.divergence}")
        lines += ["", *side_by_side("reference", self.reference, "yours", self.yours)]
        if not self.error:
            lines.append("the same text" if self.same_text else "the texts differ")
        return "\n".join(lines)


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def wrapped(text: str, width: int) -> list[str]:
    """text -> lines of at most `width` columns (CJK characters take two)."""
    lines, line = [], ""
    for ch in text.replace("\n", "⏎"):
        if display_width(line + ch) > width:
            lines.append(line)
            line = ""
        line += ch
    return lines + [line]


def side_by_side(title_a: str, a: str, title_b: str, b: str, width: int = 38) -> list[str]:
    left, right = [title_a, *wrapped(a, width)], [title_b, *wrapped(b, width)]
    left += [""] * (len(right) - len(left))
    right += [""] * (len(left) - len(right))
    return [f"{x}{' ' * (width - display_width(x))} │ {y}" for x, y in zip(left, right)]


def run_with(
    functions: Mapping[str, Callable],
    prompt: str,
    max_new_tokens: int = 24,
    seed: int = 0,
    model=None,
    tokenizer=None,
) -> WholeModelRun:
    """Run the default model (or `model`, `tokenizer`) with the student's functions
    ({exercise name: function}) in place of the package's; -> a report (print it, or let a
    notebook show it): the first divergence from the reference run and both generations."""
    from glm_numpy import ChatGLM2, ChatGLM2Tokenizer
    from glm_numpy.assets import default_model_path

    unknown = sorted(set(functions) - set(HOOKED_EXERCISES))
    if unknown:
        raise ValueError(
            f"no exercise {unknown[0]!r}: run_with takes {', '.join(HOOKED_EXERCISES)}"
        )
    model = model or ChatGLM2.from_pretrained(default_model_path())
    tokenizer = tokenizer or ChatGLM2Tokenizer.from_pretrained(default_model_path())
    ids = tokenizer.encode(prompt)
    config = generation.GenerationConfig(
        max_new_tokens=max_new_tokens, seed=seed, vocab_limit=tokenizer.vocab_size
    )
    reference_ids = StudentRun(model, {}).generate(ids, config)
    report = dict(
        functions=list(functions), prompt=prompt, reference=tokenizer.decode(reference_ids)
    )
    try:
        divergence, where = teacher_forced_divergence(model, functions, ids, reference_ids[:1])
        yours = tokenizer.decode(StudentRun(model, functions).generate(ids, config))
    except StudentError as err:
        return WholeModelRun(**report, divergence=None, divergence_in="", yours="", error=str(err))
    except (ValueError, TypeError, IndexError) as err:  # an output the model cannot use
        error = f"{type(err).__name__}: {err} (check the shape of what your function returns)"
        return WholeModelRun(**report, divergence=None, divergence_in="", yours="", error=error)
    return WholeModelRun(**report, divergence=divergence, divergence_in=where, yours=yours)


def teacher_forced_divergence(model, functions, prompt_ids, next_ids):
    """Both runs on the same tokens: the prompt, then one decode step over the KV cache
    -> (first divergence or None, in which pass)."""
    runs = StudentRun(model, {}), StudentRun(model, functions)
    passes = [(prompt_ids, "the prompt's pass"), (next_ids, "a decode step (with the KV cache)")]
    for ids, where in passes:
        if not ids:  # the reference ended at once: no decode step to compare
            break
        (_, trace_a), (_, trace_b) = (run.forward(list(ids), trace=True) for run in runs)
        divergence = first_divergence(trace_a, trace_b)
        if divergence is not None:
            return divergence, where
    return None, ""
