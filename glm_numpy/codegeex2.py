"""CodeGeeX2-6B's code-completion prompt: a language tag line, then the code to continue.

CodeGeeX2 is ChatGLM2's network trained on code, a base model that completes code rather than
chats. Its demo (THUDM/CodeGeeX2, demo/run_demo.py) writes the prompt as the language's tag, a
line feed, and the user's text, encoded with [gMASK] sop in front like any ChatGLM2 prompt:

    # language: Python
    # write a bubble sort function

The tag is a comment in that language's own syntax (evaluation/utils.py, LANGUAGE_TAG).
"""

from __future__ import annotations

# language -> its tag, grouped by the comment syntax the tag is written in
TAG_STYLES = {
    "# language: {}": (
        "CMake Dockerfile Elixir GDScript Julia Perl PowerShell Python R RMarkdown Ruby "
        "SPARQL Shell"
    ),
    "// language: {}": (
        "C C# C++ Cobol Dart F# GLSL Go Groovy Java JavaScript Kotlin Lua Objective-C "
        "Objective-C++ Pascal PHP Rust Scala Solidity TypeScript Verilog"
    ),
    "-- language: {}": "Haskell Lean SQL",
    "% language: {}": "Erlang Matlab Prolog TeX",
    "; language: {}": "Lisp Racket Scheme",
    "<!--language: {}-->": "HTML Markdown Vue",
    "/* language: {} */": "CSS Thrift",
    "' language: {}": "Excel",
}
LANGUAGE_TAGS = {
    language: style.format(language)
    for style, names in TAG_STYLES.items()
    for language in names.split()
}
LANGUAGE_TAGS.update(
    {
        "CUDA": "// language: Cuda",  # official tags that follow no group's pattern
        "Swift": "// language: swift",
        "Visual Basic": "' language: Visual Basic",
        "Delphi": "{language: Delphi}",
        "Fortran": "!language: Fortran",
        "Isabelle": "(*language: Isabelle*)",
    }
)


def language_tag(language: str) -> str:
    """'python' or 'Python' -> '# language: Python'. Unknown languages raise ValueError."""
    by_name = {name.lower(): tag for name, tag in LANGUAGE_TAGS.items()}
    tag = by_name.get(language.strip().lower())
    if tag is None:
        raise ValueError(
            f"--language {language!r}: CodeGeeX2 has no tag for it; known: "
            + ", ".join(sorted(LANGUAGE_TAGS, key=str.lower))
        )
    return tag


def code_prompt(prompt: str, language: str) -> str:
    """The text CodeGeeX2 completes: the language tag, a line feed, then the prompt."""
    return f"{language_tag(language)}\n{prompt}"
