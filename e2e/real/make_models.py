"""Writes tiny random-weight Llama models that real inference servers load.

  make_models.py hf DIR                 a Hugging Face folder (config, safetensors, tokenizer) for vLLM
  make_models.py gguf FILE [--hidden N --layers N --ffn N --f16 --seed N]
                                        a GGUF file for llama.cpp (bigger ones for the bench)

Both share one byte-level BPE tokenizer trained here on a fixed text, with a ChatML chat template,
so no model or tokenizer is downloaded. The weights are random: the output is gibberish, which is
all the tests need (they check protocol, framing, processes, timing).
"""

import argparse
import json
import os
import sys

import numpy as np

VOCAB_SIZE = 440
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "gpuswap runs one model at a time on a GPU and swaps between them when a request names "
    "another model. The supervisor starts and stops the inference servers; the gateway queues "
    "requests while a swap is under way. Hello, how are you? Say something short. "
    "The quick brown fox jumps over the lazy dog. 0123456789 "
) * 20


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    return tokenizer


def weights(hidden, layers, ffn, vocab, seed, dtype):
    """Yields (hf_name, gguf_name, array) for a Llama of the given size."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    def ones(n):
        return np.ones(n, dtype=np.float32)  # norms stay f32 in GGUF

    yield "model.embed_tokens.weight", "token_embd.weight", rand(vocab, hidden)
    for i in range(layers):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        yield p + "input_layernorm.weight", g + "attn_norm.weight", ones(hidden)
        yield p + "self_attn.q_proj.weight", g + "attn_q.weight", rand(hidden, hidden)
        yield p + "self_attn.k_proj.weight", g + "attn_k.weight", rand(hidden, hidden)
        yield p + "self_attn.v_proj.weight", g + "attn_v.weight", rand(hidden, hidden)
        yield p + "self_attn.o_proj.weight", g + "attn_output.weight", rand(hidden, hidden)
        yield p + "post_attention_layernorm.weight", g + "ffn_norm.weight", ones(hidden)
        yield p + "mlp.gate_proj.weight", g + "ffn_gate.weight", rand(ffn, hidden)
        yield p + "mlp.up_proj.weight", g + "ffn_up.weight", rand(ffn, hidden)
        yield p + "mlp.down_proj.weight", g + "ffn_down.weight", rand(hidden, ffn)
    yield "model.norm.weight", "output_norm.weight", ones(hidden)
    yield "lm_head.weight", "output.weight", rand(vocab, hidden)


def write_hf(out, args):
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id("<|im_end|>")
    bos = tokenizer.token_to_id("<|endoftext|>")
    heads = args.hidden // args.head_dim
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": args.head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": False,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos}, f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 512,
                "chat_template": CHAT_TEMPLATE,
            },
            f,
            indent=1,
        )
    tensors = {
        hf: w for hf, _, w in weights(args.hidden, args.layers, args.ffn, vocab, args.seed, np.float32)
    }
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def write_gguf(out, args):
    import gguf

    tokenizer = train_tokenizer()
    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab_size()
    tokens = [tokenizer.id_to_token(i) for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [
        gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens
    ]
    heads = args.hidden // args.head_dim
    dtype = np.float16 if args.f16 else np.float32

    tmp = out + ".tmp"  # a half-written model must never look complete
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(os.path.splitext(os.path.basename(out))[0])
    writer.add_context_length(512)
    writer.add_embedding_length(args.hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.token_to_id("<|endoftext|>"))
    writer.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for _, name, w in weights(args.hidden, args.layers, args.ffn, vocab, args.seed, dtype):
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["hf", "gguf"])
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--f16", action="store_true")
    args = parser.parse_args()
    if args.hidden % args.head_dim:
        sys.exit("--hidden must be a multiple of --head-dim")
    (write_hf if args.kind == "hf" else write_gguf)(args.out, args)


if __name__ == "__main__":
    main()
