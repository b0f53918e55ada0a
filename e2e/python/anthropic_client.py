#!/usr/bin/env python3
"""Drives a gpuswap gateway with the official anthropic SDK (Messages API).

Prints one JSON object with what the SDK saw at each step; the Rust test
(e2e/tests/it/clients_anthropic.rs) asserts on it. Exits non-zero when a step raises
something other than what that step expects, with the traceback on stderr.

Steps: a streamed message to MODEL (stopped at first: the stream waits for the
load), a message without streaming, a message to UNKNOWN (expected:
anthropic.NotFoundError) and one with a wrong key (anthropic.AuthenticationError).
The SDK sends the key as x-api-key and its anthropic-version header itself.
"""

import argparse
import json
import sys

import anthropic


def refused(call, expected):
    """Runs `call`, which must raise `expected`: what the SDK made of the error."""
    try:
        call()
    except expected as e:
        return {"raised": type(e).__name__, "status": e.status_code, "body": e.body}
    raise AssertionError(f"{expected.__name__} was not raised")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--unknown", required=True)
    args = parser.parse_args()
    client = anthropic.Anthropic(base_url=args.base_url, api_key=args.key, max_retries=0)
    messages = [{"role": "user", "content": "hello"}]

    with client.messages.stream(model=args.model, max_tokens=8, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    streamed = {
        "text": text,
        "model": final.model,
        "stop_reason": final.stop_reason,
        "output_tokens": final.usage.output_tokens,
    }

    message = client.messages.create(model=args.model, max_tokens=8, messages=messages)
    created = {
        "text": "".join(block.text for block in message.content if block.type == "text"),
        "type": message.type,
        "role": message.role,
    }

    unknown = refused(
        lambda: client.messages.create(model=args.unknown, max_tokens=8, messages=messages),
        anthropic.NotFoundError,
    )
    wrong = anthropic.Anthropic(base_url=args.base_url, api_key="wrong-key", max_retries=0)
    unauthorized = refused(
        lambda: wrong.messages.create(model=args.model, max_tokens=8, messages=messages),
        anthropic.AuthenticationError,
    )
    json.dump(
        {"stream": streamed, "message": created, "unknown": unknown, "unauthorized": unauthorized},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
