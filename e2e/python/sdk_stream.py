"""What the openai SDK shows of a streamed chat, read the way SDK users read it.

Shared by the clients that stream (openai_client.py, real_servers_client.py).
"""

import time


def read_chat_stream(stream, started):
    """Reads a streamed chat (asked for at `started`, time.monotonic()) to its end.

    The answer assembled from the deltas; gpuswap's swap progress apart (it comes as the
    deltas' extra reasoning_content, from chunks with the id "gpuswap-progress", whose
    model is not the answer's); the usage chunk (stream_options.include_usage) and how
    many chunks came after it (it must be the last).
    """
    content, reasoning, models, finish_reasons = [], [], set(), []
    chunks, usage, usage_chunk_choices, after_usage, first_content = 0, None, None, 0, None
    for chunk in stream:
        chunks += 1
        if usage is not None:
            after_usage += 1
        if chunk.id != "gpuswap-progress" and chunk.model:
            models.add(chunk.model)
        for choice in chunk.choices:
            # Not an SDK field: gpuswap's swap progress, kept as an extra.
            extra = getattr(choice.delta, "reasoning_content", None)
            if extra:
                reasoning.append(extra)
            if choice.delta.content:
                if first_content is None:
                    first_content = time.monotonic() - started
                content.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
            usage_chunk_choices = len(chunk.choices)
    return {
        "chunks": chunks,
        "content": "".join(content),
        "reasoning": "".join(reasoning),
        "models": sorted(models),
        "finish_reasons": finish_reasons,
        "usage": usage,
        "usage_chunk_choices": usage_chunk_choices,
        "chunks_after_usage": after_usage,
        "first_content_s": first_content,
    }
