#!/usr/bin/env python3
"""Drives a gpuswap gateway in front of real inference servers with the official openai SDK.

For each model of --sequence (in order, so consecutive models on one GPU swap): a chat without
streaming, then a streaming chat asking for usage (stream_options.include_usage). Prints one JSON
list, a step per model, with what the SDK saw; e2e/tests/it/real_servers.rs asserts on it. Any exception
ends the script non-zero with the traceback on stderr.
"""

import argparse
import json
import time

import openai

from sdk_stream import read_chat_stream

MESSAGES = [{"role": "user", "content": "Say something short."}]


def chat(client, model, max_tokens):
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens
    )
    choice = completion.choices[0]
    return {
        "model": completion.model,
        "object": completion.object,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": completion.usage.model_dump() if completion.usage else None,
    }


def chat_stream(client, model, max_tokens):
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    return read_chat_stream(stream, started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--sequence", required=True, help="comma-separated model names")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    # A swap to vLLM on a loaded 2-core machine takes a minute or more.
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", timeout=900, max_retries=0)
    steps = []
    for model in args.sequence.split(","):
        steps.append(
            {
                "asked": model,
                "chat": chat(client, model, args.max_tokens),
                "stream": chat_stream(client, model, args.max_tokens),
            }
        )
    print(json.dumps(steps))


if __name__ == "__main__":
    main()
