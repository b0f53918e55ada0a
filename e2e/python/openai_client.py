#!/usr/bin/env python3
"""Drives a gpuswap gateway with the official openai SDK, the way applications do.

Prints one JSON object with what the SDK saw at each step; the Rust test
(e2e/tests/it/clients_openai.rs) asserts on it. Exits non-zero when a step raises
something other than what that step expects, with the traceback on stderr.

Steps: list models, retrieve one, chat without and with streaming on FIRST,
a chat to an unknown model (expected: openai.NotFoundError), then a chat to
SECOND (which conflicts with FIRST, so the gateway swaps) and back to FIRST.
"""

import argparse
import json
import sys
import time

import openai

from sdk_stream import read_chat_stream


def chat(client, model):
    """A non-streaming chat: the model and text of the answer."""
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
    )
    choice = completion.choices[0]
    return {
        "model": completion.model,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "object": completion.object,
    }


def chat_stream(client, model):
    """A streaming chat: the answer assembled from the deltas, as SDK users do."""
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        stream=True,
    )
    return read_chat_stream(stream, started)


def unknown_model(client, model):
    """A chat naming a model nobody configured: the SDK should raise NotFoundError."""
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}]
        )
    except openai.APIStatusError as error:
        return {
            "raised": type(error).__name__,
            "status": error.status_code,
            "code": error.code,
            "type": error.type,
            "message": error.message,
        }
    return {"raised": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True, help="the gateway, with /v1")
    parser.add_argument("--first", required=True, help="a configured model")
    parser.add_argument("--second", required=True, help="a model that conflicts with FIRST")
    parser.add_argument("--unknown", required=True, help="a model nobody configured")
    args = parser.parse_args()

    # The gateway is open (no api_keys); the SDK insists on some key.
    # Swaps take seconds on a loaded machine: no SDK retries (a retry would
    # hide a failed first attempt) and a generous timeout.
    client = openai.OpenAI(
        base_url=args.base_url, api_key="unused", max_retries=0, timeout=120.0
    )
    results = {"sdk_version": openai.__version__}
    results["models"] = [model.id for model in client.models.list()]
    retrieved = client.models.retrieve(args.first)
    results["retrieved"] = {"id": retrieved.id, "object": retrieved.object}
    results["chat"] = chat(client, args.first)
    results["stream"] = chat_stream(client, args.first)
    results["unknown"] = unknown_model(client, args.unknown)
    results["swap"] = [
        chat_stream(client, args.second),
        chat(client, args.first),
    ]
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
