#!/usr/bin/env python3
"""llama.cpp's own figures on a GGUF file, through llama-cpp-python, for the
`embedded` bench (server/benches/embedded.rs) and the tokenizer test.

    pip install llama-cpp-python==0.3.36    # builds llama.cpp from the sdist
    python3 llama_cpp_reference.py tokens <file.gguf>
    python3 llama_cpp_reference.py bench  <file.gguf> [--threads 2] [--tokens 200] [--rounds 3]

`tokens` prints the token ids of the sentences in the tokenizer test
(server/src/providers/embedded/model.rs) and of the e2e test's question
(tests/e2e/embedded_real.rs), and the greedy answer's ids.

`bench` measures what the Rust bench measures, on the same prompt (the file's
chat template with PROMPT as the user turn), greedy, `--threads` threads:
the first token of the first call after loading (cold), the first token of
the same prompt again (warm: llama-cpp-python reuses the cached prefix), and
decode tokens per second, the median of `--rounds` rounds. Its last line is
JSON: {"decode_tokens_per_s": .., "ttft_cold_ms": .., "ttft_warm_ms": ..}.
"""

import argparse
import json
import statistics
import sys
import time

# The bench's prompt; keep it equal to PROMPT in server/benches/embedded.rs.
PROMPT = "Tell me a long story about the sea and the wind."
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SENTENCES = [
    "Hello world! 123 4567 numbers, and  spaces.",
    "The year 2024 had 366 days; \u03c0\u22483.14159!",
    "  leading spaces\ttabs\nnewlines",
    "Don't split contractions: we'll, they're, I'm.",
    "Numbers 1234567890 and 12,345.67 $99",
]
QUESTION = "What is the capital of France? Answer in one sentence."


def chatml(user: str) -> str:
    """SmolLM2's chat template, rendered for one user turn (its default system turn)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def load(path: str, threads: int):
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def tokens(path: str) -> None:
    m = load(path, 2)
    for s in SENTENCES:
        print(repr(s), m.tokenize(s.encode(), add_bos=False, special=False))
    prompt = m.tokenize(chatml(QUESTION).encode(), add_bos=False, special=True)
    print("question prompt", len(prompt), prompt)
    answer = []
    for t in m.generate(prompt, temp=0.0, top_k=1):
        if t == m.token_eos() or len(answer) >= 64:
            break
        answer.append(t)
    print("answer", len(answer), answer, repr(m.detokenize(answer).decode()))


def one_call(m, prompt, max_tokens: int):
    """(seconds to the first token, decode tokens/s after it, tokens)."""
    start = time.perf_counter()
    first = None
    n = 0
    for t in m.generate(prompt, temp=0.0, top_k=1):
        n += 1
        if first is None:
            first = time.perf_counter()
        if t == m.token_eos() or n >= max_tokens:
            break
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if n > 1 else 0.0
    return first - start, rate, n


def bench(path: str, threads: int, max_tokens: int, rounds: int) -> None:
    rates, colds, warms = [], [], []
    for _ in range(rounds):
        m = load(path, threads)
        prompt = m.tokenize(chatml(PROMPT).encode(), add_bos=False, special=True)
        cold, rate, n = one_call(m, prompt, max_tokens)
        colds.append(cold)
        rates.append(rate)
        # The same prompt again: llama-cpp-python keeps the prefix it holds.
        warm, rate, _ = one_call(m, prompt, max_tokens)
        warms.append(warm)
        rates.append(rate)
        print(
            f"llama.cpp: {n} tokens, decode {rate:.1f} tokens/s, "
            f"first token cold {cold * 1000:.1f} ms, warm {warm * 1000:.1f} ms",
            file=sys.stderr,
        )
        del m
    print(
        json.dumps(
            {
                "decode_tokens_per_s": statistics.median(rates),
                "ttft_cold_ms": statistics.median(colds) * 1000,
                "ttft_warm_ms": statistics.median(warms) * 1000,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["tokens", "bench"])
    p.add_argument("file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.mode == "tokens":
        tokens(a.file)
    else:
        bench(a.file, a.threads, a.tokens, a.rounds)


if __name__ == "__main__":
    main()
